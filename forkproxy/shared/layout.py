"""The shared mapping's layout: where every field lives. The one definition of it.

The master creates one memfd mapping before the first fork (mapping.py); every worker,
whichever engine it runs, and a re-executed master use it at these offsets. The compiled
engine hard-codes none of them: it gets `engine_offsets()`. Only fixed-width integers,
naturally aligned, so a reader sees each field old or new, never torn. Changing anything
below means a new LAYOUT_VERSION. Never touches memory: offsets and sizes only.

Header (absolute byte offsets; int64 unless marked):

  offset  field            unit                                 writer
  0       MAGIC            MAGIC_VALUE                          master, at creation
  8       VERSION          LAYOUT_VERSION                       master, at creation
  16      MAPPING_BYTES    bytes of the whole mapping           master, at creation
  64      MUTEX            pthread_mutex_t, process-shared and  initialised by the master;
                           robust; MUTEX_BYTES reserved         taken by admitting workers
  128     CAPACITY         the global cap (--connections-max)   master
  136     SLOT_HIGH_WATER  slots [0, this) may hold units       master, before forking
                                                                into a higher slot
  144     CAPACITY_SEQ     uint32 futex word: changes when      any process, atomically
                           capacity comes back to waiters
  148     WAITERS          uint32: queue-mode waiters now       any process, atomically
  152     SOURCE_LIMIT     --connections-max-per-source, 0 off  master
  160     SOURCE_ENTRIES   rows of the per-source table         master, at creation
  168     SOURCE_DIRTY     row + 1 whose key is being written   the admission mutex's
                           under the mutex, else 0              holder
  192-511 reserved for the master (reload)
  512     ROUND_ROBIN      MAX_ROUTES int64: the next target    any worker; a lost update
                           of each route, round-robin           only skews the rotation

Slots (MAX_SLOTS of SLOT_BYTES from SLOTS; one per worker process, old and new
generations of up to 128 workers each). The first SLOT_WORDS int64 words, by index:

  index  field                 unit                           writer
  0      PID                   pid                            worker, at start
  1      GENERATION            rotation number                master, before fork
  2      STATE                 SlotState                      master before fork, then worker
  3      HEARTBEAT_NS          CLOCK_MONOTONIC ns             worker, each heartbeat
  4      STARTED_NS            CLOCK_MONOTONIC ns             master, before fork
  5      LAST_ACTIVITY_NS      CLOCK_MONOTONIC ns             worker, when a connection ends
  6      ACTIVE                connections open now           worker
  7-12   ACCEPTED, REFUSED, CONNECT_ERRORS, BYTES_TO_TARGET, BYTES_TO_CLIENT, CLOSED:
                               monotonic totals (bytes in bytes)   worker
  13-42  two histograms, connect time and connection lifetime: per-bucket counts
         (bucket i counts observations <= bounds[i], the last +Inf), then the sum in ns
                                                              worker
  43     HELD                  units of the global cap held:  worker (+1 under the mutex,
                               admitted, not yet released     -1 without); master zeroes
                                                              it after reaping the worker
  44     WAITING               1 while this worker counts     worker
                               itself in WAITERS
  45     ACCESS_LOG_DROPPED    access-log lines not written   worker
                               (a full disk, EAGAIN, EIO)
  46-58  PROXY_HEADER_ERRORS   connections closed for their   worker
         + reason's index      PROXY header (--accept-proxy),
                               by relay/accept_proxy.METRIC_REASONS
  59-63  reserved
  The counters 7-42 and 45-58 (SLOT_COUNTERS) are folded into RETIRED when the worker is
  reaped, so totals never go backwards. (45-58 were reserved words, zero in an older
  mapping, so the layout version stays.)

  Then, per-listener and per-target metrics (each row is ROW_WORDS int64 words of this
  worker, written by it only, folded into RETIRED_ROWS when it is reaped):
  LISTENER_ROWS  MAX_LISTENERS rows, by the listener's index among the master's
                 listeners. A row's words are what its listener's kind needs. A
                 datagram listener's (relay/datagram.py), by word:
                   0  DG_SESSIONS_ACTIVE   sessions open now (a gauge: summed over live
                                           slots only; its folded total means nothing)
                   1  DG_SESSIONS          sessions opened
                   2  DG_TO_TARGET         datagrams sent to targets
                   3  DG_TO_CLIENT         datagrams sent to clients
                   4  DG_BYTES_TO_TARGET   their bytes
                   5  DG_BYTES_TO_CLIENT
                   6- DG_DROPPED + reason  datagrams dropped, by DG_DROP_REASONS
                 A stream or sequential-packet listener's, by word:
                   0  L_CONNECTIONS        clients admitted (their sum over listeners
                                           is ACCEPTED's)
                   1- L_REFUSED + reason   clients closed unserved, by LISTENER_REFUSALS:
                                           cap, per_source, busy (admission refused
                                           them: REFUSED counts these too), no_target
                                           (admitted, but no target could be connected
                                           to), proxy_header (a bad PROXY header in)
  TARGET_ROWS    MAX_TARGETS rows, by the row of the target table (below) the master
                 gave the (listener, target), by word:
                   0  T_ACTIVE             connections to it open now (a gauge, as
                                           DG_SESSIONS_ACTIVE)
                   1  T_CONNECTIONS        connections made to it (connect succeeded)
                   2  T_BYTES_TO_TARGET    bytes relayed to it
                   3  T_BYTES_TO_CLIENT    bytes relayed from it
                   4- T_CONNECT_ERRORS + reason  failed connect attempts, by
                                           CONNECT_ERROR_REASONS (refused, timeout,
                                           unreachable, other: `connect_error_reason`);
                                           CONNECT_ERRORS counts each of them too
  Only the rows the master has handed out are folded and summed (`listener_rows`,
  `target_rows` of the scoreboard): never-used rows are never touched.

After the slots (master only, so a re-executed master keeps counters monotonic):
  RETIRED       MAX_SLOTS x SLOT_WORDS int64: per slot, the counters of its dead workers
  RETIRED_ROWS  (MAX_LISTENERS + MAX_TARGETS) x ROW_WORDS int64: the rows' dead totals,
                listener rows first

Target table: TARGETS, MAX_TARGETS rows of TARGET_ROW_BYTES, one per (listener, target)
of the configuration (shared/targets_table.py). By byte offset inside a row:

  offset  field              unit                                writer
  0       KEY                the (listener, target) it is for:   master, when it hands
                             a 64-bit hash; 0: never used        the row out
  8       UP                 1: up, or not checked; 0: active    master (checker); 1
                             checks failed it                    when checks are off
  16      COOLDOWN_UNTIL_NS  CLOCK_MONOTONIC ns: a connect       any worker, after a
                             failed, skip it until then          failed connect (last
                                                                 writer wins: benign)
  24      STREAK             checks in a row: n > 0 passed,      master (checker)
                             -n failed
  32      CHECKED_NS         CLOCK_MONOTONIC ns of the last      master (checker)
                             check's end; 0: none yet
  40      CHANGED_NS         CLOCK_MONOTONIC ns UP last changed  master (checker)
  48      REASON             why the last check failed           master (checker)
                             (CheckReason); 0: it passed
  56      DETAIL             its errno, or the HTTP status       master (checker)
A target is usable when UP is 1 and COOLDOWN_UNTIL_NS is not in the future.

Check durations (CHECK_DURATION, master only): the active checks' histogram, bucket
counts (bounds CHECK_DURATION_BOUNDS, the last +Inf) then the sum in ns.

Per-source table, SOURCE_ENTRIES rows of SOURCE_ROW_BYTES from SOURCE_TABLE:
  bytes 0-15   the source's key (IPv6, IPv4 as v4-mapped); all zeros: never used;
               all ones: cleared                                the mutex's holder
  16-...       MAX_SLOTS uint16 counts: this source's           each slot's worker (+1
               connections in each slot                         under the mutex, -1
                                                                without); the master
                                                                zeroes a reaped slot's
                                                                column
"""

import mmap

from forkproxy.settings.config import MAX_WORKERS

WORD = 8
PAGE = mmap.PAGESIZE

MAGIC_VALUE = int.from_bytes(b"FPXSHM\0\0", "little")
LAYOUT_VERSION = 4  # 3: the compiled engine's; 4: the target table and rows

# -- header --------------------------------------------------------------------------------
HEADER_BYTES = 4096
MAGIC = 0
VERSION = 8
MAPPING_BYTES = 16
MUTEX = 64
MUTEX_BYTES = 64  # pthread_mutex_t is 40 bytes on x86-64, 48 on aarch64
CAPACITY = 128
SLOT_HIGH_WATER = 136
CAPACITY_SEQ = 144  # uint32
WAITERS = 148  # uint32
SOURCE_LIMIT = 152
SOURCE_ENTRIES = 160
SOURCE_DIRTY = 168
ROUND_ROBIN = 512
MAX_ROUTES = 64

# -- slots ---------------------------------------------------------------------------------
MAX_SLOTS = 2 * MAX_WORKERS  # 256: old and new generations of up to 128 workers each
SLOT_WORDS = 64

PID = 0
GENERATION = 1
STATE = 2
HEARTBEAT_NS = 3
STARTED_NS = 4
LAST_ACTIVITY_NS = 5
ACTIVE = 6

FIRST_COUNTER = 7
ACCEPTED = 7
REFUSED = 8
CONNECT_ERRORS = 9
BYTES_TO_TARGET = 10
BYTES_TO_CLIENT = 11
CLOSED = 12

# Seconds to connect to the target, and lifetime of relayed connections.
CONNECT_DURATION_BOUNDS: tuple[float, ...] = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
CONNECTION_DURATION_BOUNDS: tuple[float, ...] = (
    0.001,
    0.01,
    0.1,
    0.5,
    1.0,
    5.0,
    10.0,
    30.0,
    60.0,
    300.0,
    1800.0,
    3600.0,
)
CONNECT_DURATION_BUCKETS = 13
CONNECT_DURATION_SUM_NS = CONNECT_DURATION_BUCKETS + len(CONNECT_DURATION_BOUNDS) + 1
CONNECTION_DURATION_BUCKETS = CONNECT_DURATION_SUM_NS + 1
CONNECTION_DURATION_SUM_NS = CONNECTION_DURATION_BUCKETS + len(CONNECTION_DURATION_BOUNDS) + 1
COUNTERS_END = CONNECTION_DURATION_SUM_NS + 1  # counters: [FIRST_COUNTER, COUNTERS_END)

HELD = COUNTERS_END
WAITING = HELD + 1
ACCESS_LOG_DROPPED = WAITING + 1
PROXY_HEADER_ERRORS = ACCESS_LOG_DROPPED + 1  # + the reason's index
PROXY_HEADER_REASONS_MAX = 13  # words for relay/accept_proxy.METRIC_REASONS
SLOT_COUNTERS = (
    *range(FIRST_COUNTER, COUNTERS_END),
    *range(ACCESS_LOG_DROPPED, PROXY_HEADER_ERRORS + PROXY_HEADER_REASONS_MAX),
)
assert PROXY_HEADER_ERRORS + PROXY_HEADER_REASONS_MAX <= SLOT_WORDS

ROW_WORDS = 16
MAX_LISTENERS = 64
MAX_TARGETS = 256
LISTENER_ROWS = SLOT_WORDS * WORD  # byte offset inside a slot
TARGET_ROWS = LISTENER_ROWS + MAX_LISTENERS * ROW_WORDS * WORD

# A datagram listener's row, by word (see above).
DG_SESSIONS_ACTIVE = 0
DG_SESSIONS = 1
DG_TO_TARGET = 2
DG_TO_CLIENT = 3
DG_BYTES_TO_TARGET = 4
DG_BYTES_TO_CLIENT = 5
DG_DROPPED = 6  # + the reason's index in DG_DROP_REASONS
# Why a datagram was dropped (the `reason` label of forkproxy_datagrams_dropped_total).
DG_DROP_REASONS = ("cap", "per_source", "busy", "truncated", "send_error", "no_session")
assert DG_DROPPED + len(DG_DROP_REASONS) <= ROW_WORDS

# A stream or sequential-packet listener's row, by word (see above).
L_CONNECTIONS = 0
L_REFUSED = 1  # + the reason's index in LISTENER_REFUSALS
# Why a client was closed unserved (the `reason` label of
# forkproxy_listener_connections_refused_total).
LISTENER_REFUSALS = ("cap", "per_source", "busy", "no_target", "proxy_header")
assert L_REFUSED + len(LISTENER_REFUSALS) <= ROW_WORDS

# A target's row, by word (see above).
T_ACTIVE = 0
T_CONNECTIONS = 1
T_BYTES_TO_TARGET = 2
T_BYTES_TO_CLIENT = 3
T_CONNECT_ERRORS = 4  # + the reason's index in CONNECT_ERROR_REASONS
# Why a connect attempt failed (the `reason` label of
# forkproxy_target_connect_errors_total); `connect_error_reason` sorts errnos.
CONNECT_ERROR_REASONS = ("refused", "timeout", "unreachable", "other")
assert T_CONNECT_ERRORS + len(CONNECT_ERROR_REASONS) <= ROW_WORDS


def _pages(size: int) -> int:
    """`size` rounded up to whole pages."""
    return -(-size // PAGE) * PAGE


SLOT_BYTES = _pages(TARGET_ROWS + MAX_TARGETS * ROW_WORDS * WORD)  # a slot's pages are its own
SLOT_STRIDE = SLOT_BYTES // WORD  # words from a slot's word to the next slot's
SLOTS = HEADER_BYTES

# -- the master's retired totals -------------------------------------------------------------
RETIRED = SLOTS + MAX_SLOTS * SLOT_BYTES
RETIRED_ROWS = RETIRED + MAX_SLOTS * SLOT_WORDS * WORD

# -- target table ----------------------------------------------------------------------------
TARGETS = _pages(RETIRED_ROWS + (MAX_LISTENERS + MAX_TARGETS) * ROW_WORDS * WORD)
TARGET_ROW_BYTES = 64
# Byte offsets inside a target row. KEY is first: the engine takes an optional field at
# offset 0 for "off", and UP and COOLDOWN_UNTIL_NS are what it reads.
KEY = 0
UP = 8
COOLDOWN_UNTIL_NS = 16
STREAK = 24
CHECKED_NS = 32
CHANGED_NS = 40
REASON = 48
DETAIL = 56
assert DETAIL + WORD <= TARGET_ROW_BYTES

# -- the active checks' durations (master only) ----------------------------------------------
CHECK_DURATION = TARGETS + MAX_TARGETS * TARGET_ROW_BYTES
CHECK_DURATION_BOUNDS = CONNECT_DURATION_BOUNDS  # a check is mostly a connect
CHECK_DURATION_WORDS = len(CHECK_DURATION_BOUNDS) + 2  # the buckets, +Inf, the sum in ns

# -- per-source table ------------------------------------------------------------------------
SOURCE_TABLE = _pages(CHECK_DURATION + CHECK_DURATION_WORDS * WORD)
KEY_SIZE = 16
SOURCE_COUNTS = KEY_SIZE  # byte offset of the counts inside a row
SOURCE_ROW_BYTES = KEY_SIZE + 2 * MAX_SLOTS
# The most sources the table is sized for: with more distinct client addresses connected
# at once than 2 x this, a new one is refused (see per_source.py).
PER_SOURCE_SOURCES_MAX = 16384


def source_entries(connections_max: int) -> int:
    """Rows of the per-source table for a cap: twice the most sources that can be
    connected at once, so a probe meets a never-used row soon (see per_source.py)."""
    return 2 * min(connections_max, PER_SOURCE_SOURCES_MAX)


def mapping_bytes(entries: int) -> int:
    """The size of a mapping whose per-source table has `entries` rows."""
    return _pages(SOURCE_TABLE + entries * SOURCE_ROW_BYTES)


def engine_offsets() -> dict[str, object]:
    """The layout as the compiled engine takes it: byte offsets (header fields absolute,
    slot fields inside a slot), sizes, and the histograms' bounds in seconds."""
    return {
        "layout_version": LAYOUT_VERSION,
        "version": VERSION,
        "mutex": MUTEX,
        "capacity": CAPACITY,
        "slot_high_water": SLOT_HIGH_WATER,
        "capacity_seq": CAPACITY_SEQ,
        "waiters": WAITERS,
        "source_limit": SOURCE_LIMIT,
        "source_entries": SOURCE_ENTRIES,
        "source_dirty": SOURCE_DIRTY,
        "source_table": SOURCE_TABLE,
        "source_row_bytes": SOURCE_ROW_BYTES,
        "source_counts": SOURCE_COUNTS,
        "round_robin": ROUND_ROBIN,
        "max_routes": MAX_ROUTES,
        "slots": SLOTS,
        "slot_bytes": SLOT_BYTES,
        "max_slots": MAX_SLOTS,
        "held": HELD * WORD,
        "waiting": WAITING * WORD,
        "access_log_dropped": ACCESS_LOG_DROPPED * WORD,
        "proxy_header_errors": PROXY_HEADER_ERRORS * WORD,
        "pid": PID * WORD,
        "state": STATE * WORD,
        "heartbeat_ns": HEARTBEAT_NS * WORD,
        "active": ACTIVE * WORD,
        "accepted": ACCEPTED * WORD,
        "refused": REFUSED * WORD,
        "connect_errors": CONNECT_ERRORS * WORD,
        "bytes_to_target": BYTES_TO_TARGET * WORD,
        "bytes_to_client": BYTES_TO_CLIENT * WORD,
        "closed": CLOSED * WORD,
        "last_activity_ns": LAST_ACTIVITY_NS * WORD,
        "connect_duration_buckets": CONNECT_DURATION_BUCKETS * WORD,
        "connect_duration_sum_ns": CONNECT_DURATION_SUM_NS * WORD,
        "connection_duration_buckets": CONNECTION_DURATION_BUCKETS * WORD,
        "connection_duration_sum_ns": CONNECTION_DURATION_SUM_NS * WORD,
        "connect_duration_bounds": CONNECT_DURATION_BOUNDS,
        "connection_duration_bounds": CONNECTION_DURATION_BOUNDS,
        "listener_rows": LISTENER_ROWS,
        "max_listeners": MAX_LISTENERS,
        "target_rows": TARGET_ROWS,
        "max_targets": MAX_TARGETS,
        "row_words": ROW_WORDS,
        "targets": TARGETS,
        "target_row_bytes": TARGET_ROW_BYTES,
        "target_up": UP,
        "target_cooldown_until_ns": COOLDOWN_UNTIL_NS,
        # Byte offsets inside a listener's or a target's row of a slot (always there).
        "listener_connections": L_CONNECTIONS * WORD,
        "listener_refused": L_REFUSED * WORD,
        "listener_refusals": LISTENER_REFUSALS,
        "target_active": T_ACTIVE * WORD,
        "target_connections": T_CONNECTIONS * WORD,
        "target_bytes_to_target": T_BYTES_TO_TARGET * WORD,
        "target_bytes_to_client": T_BYTES_TO_CLIENT * WORD,
        "target_connect_errors": T_CONNECT_ERRORS * WORD,
        "connect_error_reasons": CONNECT_ERROR_REASONS,
        # Byte offsets inside a datagram listener's row.
        "dg_sessions_active": DG_SESSIONS_ACTIVE * WORD,
        "dg_sessions": DG_SESSIONS * WORD,
        "dg_to_target": DG_TO_TARGET * WORD,
        "dg_to_client": DG_TO_CLIENT * WORD,
        "dg_bytes_to_target": DG_BYTES_TO_TARGET * WORD,
        "dg_bytes_to_client": DG_BYTES_TO_CLIENT * WORD,
        "dg_dropped": DG_DROPPED * WORD,
        "datagram_drop_reasons": DG_DROP_REASONS,
    }
