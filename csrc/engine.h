/* The compiled relay engine (forkproxy.relay._engine): declarations shared by its files.
 *
 * One Engine per worker process, used from one thread. It owns an epoll fd (nested in
 * the worker's event loop), a timerfd, the connections it accepted and its pipe pool;
 * it never owns the listeners (systemd's or the master's) and never logs: conditions go
 * to hooks.on_event, rate-limited (see module.c). Layout of the shared mapping: README.md.
 *
 * Files: module.c (the module), engine.c (the Engine type), config.c (its configuration),
 * hooks.c (calls to Python, events), loop.c (epoll, timers, queues), admission.c (the
 * shared mapping's lock, caps), accept.c, connect.c (targets, failover), relay.c (splice),
 * proxy_header.c (PROXY protocol encoding); formats.h: the pure pieces (PROXY header
 * parsing, the access-log line) and their files.
 */
#ifndef FORKPROXY_ENGINE_H
#define FORKPROXY_ENGINE_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <netinet/in.h>
#include <pthread.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/socket.h>
#include <sys/un.h>

#include "formats.h"

#define container_of(ptr, type, member) ((type *)((char *)(ptr) - offsetof(type, member)))

/* -- intrusive doubly linked lists (a head is a link pointing at itself when empty) -- */
struct link {
    struct link *prev, *next;
};
static inline void list_init(struct link *head) { head->prev = head->next = head; }
static inline bool list_empty(const struct link *head) { return head->next == head; }
static inline bool linked(const struct link *item) { return item->next != NULL; }
static inline void list_add_tail(struct link *head, struct link *item)
{
    item->prev = head->prev;
    item->next = head;
    head->prev->next = item;
    head->prev = item;
}
static inline void list_del(struct link *item)
{
    if (item->next == NULL)
        return;
    item->prev->next = item->next;
    item->next->prev = item->prev;
    item->prev = item->next = NULL;
}

/* -- what an epoll event's data.ptr points at: a tag, first member of its owner -- */
enum watch_kind { WATCH_LISTENER = 1, WATCH_TIMER, WATCH_CLIENT, WATCH_TARGET, WATCH_DATAGRAM,
                  WATCH_SESSION };
struct watch {
    uint8_t kind;
};

/* -- events reported to hooks.on_event(code, count, errno, (index, subject)) -- */
enum event_code {
    EVENT_REFUSED_CAP = 0,   /* (listener, client): global cap reached */
    EVENT_REFUSED_SOURCE,    /* (listener, client): per-source limit reached */
    EVENT_REFUSED_BUSY,      /* (listener, client): admission lock held too long */
    EVENT_CONNECT_FAILED,    /* (route, client): every target failed this client */
    EVENT_TARGET_FAILED,     /* (route, target): a target failed and cools down */
    EVENT_ACCEPT_ERROR,      /* (listener, None): accept4 failed (errno) */
    EVENT_FD_LOW,            /* (listener, None): descriptors short, accepts paused */
    EVENT_RELAY_ERROR,       /* (listener, client): a relay failed, not a peer's doing */
    EVENT_CONNECT_PAUSED,    /* (route, client): no descriptor for a target socket: the client
                                is kept and retried, accepts pause */
    /* datagram listeners (datagram.c): index is the datagram listener's */
    EVENT_DG_CAP,            /* (listener, client): a new client's datagram dropped at the cap */
    EVENT_DG_SOURCE,         /* (listener, client): ... at its source's limit */
    EVENT_DG_BUSY,           /* (listener, client): ... the admission lock stayed taken */
    EVENT_DG_TRUNCATED,      /* (listener, client): larger than the buffer (errno: its size) */
    EVENT_DG_SEND_ERROR,     /* (listener, client): the kernel would not send it to the target */
    EVENT_DG_REFUSED,        /* (listener, client): an earlier one the target's host refused */
    EVENT_DG_REPLY_ERROR,    /* (listener, client): a reply the kernel would not send back */
    EVENT_DG_NO_SESSION,     /* (listener, client): no socket to any target could be opened */
    EVENT_DG_READ_ERROR,     /* (listener, None): reading the listener failed */
    EVENT_DG_TARGET_FAILED,  /* (listener, target): a datagram target refused, cools down */
    EVENT_KINDS
};

struct event_state {
    int64_t next_ns;      /* reports before this are only counted */
    uint64_t count;       /* occurrences not yet reported */
    int error;            /* of the last occurrence */
    int index;
    PyObject *target;     /* borrowed (targets live as long as the engine), or NULL */
    struct sockaddr_storage peer; /* the client's address, when peerlen > 0 */
    socklen_t peerlen;
    bool pair;            /* both given: the subject is (client, target) */
};

/* -- the shared mapping: offsets from Python (shared/layout.py's engine_offsets()),
 * checked at construction; config.c's layout_fields[] lists every one the engine reads -- */
struct layout {
    int64_t layout_version;    /* LAYOUT_VERSION: the mapping's VERSION word must hold it */
    /* header, absolute byte offsets */
    size_t version, mutex, capacity, slot_high_water, capacity_seq, waiters;
    size_t source_limit, source_entries, source_dirty, source_table, source_row_bytes,
        source_counts;
    /* slots */
    size_t slots, slot_bytes, max_slots;
    /* fields within a slot, relative byte offsets */
    size_t held, waiting, active, accepted, refused, connect_errors, bytes_to_target,
        bytes_to_client, closed, last_activity_ns, connect_buckets, connect_sum_ns,
        connection_buckets, connection_sum_ns;
    /* the round-robin words (header), and the per-listener and per-target rows (slot):
     * listener_rows or target_rows 0 turns its rows off; row fields are relative to a row */
    size_t round_robin, max_routes, listener_rows, max_listeners, target_rows, max_targets,
        row_words;
    size_t listener_connections, listener_refused, target_active, target_connections,
        target_bytes_to_target, target_bytes_to_client, target_connect_errors;
    /* the target table (absolute; 0: none), its row size and fields inside a row */
    size_t targets, target_row_bytes, target_up, target_cooldown_until_ns;
    /* a datagram listener's row fields (relative to its row) */
    size_t dg_sessions_active, dg_sessions, dg_to_target, dg_to_client, dg_bytes_to_target,
        dg_bytes_to_client, dg_dropped;
    size_t access_log_dropped; /* slot */
};

/* Indexes in the layout's reason tuples (checked against them at construction). */
enum listener_refusal { L_CAP = 0, L_PER_SOURCE, L_BUSY, L_NO_TARGET, L_PROXY_HEADER,
                        LISTENER_REFUSALS };
enum connect_error_reason { CE_REFUSED = 0, CE_TIMEOUT, CE_UNREACHABLE, CE_OTHER,
                            CONNECT_ERROR_REASONS };
enum datagram_drop { DG_CAP = 0, DG_PER_SOURCE, DG_BUSY, DG_TRUNCATED, DG_SEND_ERROR,
                     DG_NO_SESSION, DG_DROP_REASONS };

#define MAX_BOUNDS 32
struct histogram {
    int count;                 /* bounds; buckets are count + 1 (the last is +Inf) */
    int64_t bound_ns[MAX_BOUNDS];
    size_t buckets, sum_ns;    /* slot-relative offsets */
};

/* -- targets, their groups, and routes -- */
struct target {
    PyObject *object;          /* the Python target, for events and resolve */
    int family;                /* 0: a host name to resolve each time */
    struct sockaddr_storage addr;
    socklen_t addrlen;
    PyObject *host;            /* family 0: str host and port for hooks.resolve */
    int port;
    char scope[16];            /* an IPv6 scope's interface name not found at start: looked
                                  up again at each connect (ENODEV while missing) */
    char *text;                /* as written (UTF-8), for the access log */
    size_t text_len;
    int64_t cooling_until_ns;  /* this worker's passive cool-down (no table row) */
    int row;                   /* its row of the target table and of the slot's target rows,
                                  or -1: none (this worker's own cool-down then) */
};

/* The targets of one or more routes, with this worker's round-robin and cool-down (routes
 * with the same targets, connect timeout and TCP options share one, as targets.py's
 * TargetGroup is shared). */
struct group {
    int count;
    unsigned next;             /* round-robin start, this worker's (no table rows) */
    struct target *targets;
    bool shared;               /* its targets have rows: the shared table decides (balance.py) */
    bool first;                /* --balance first: usable targets in the order given */
    int turn;                  /* its word of the header's ROUND_ROBIN array, or -1 */
};

#define MAX_OPTIONS 8
/* A kernel pipe used as a splice buffer */
struct pipe_buf {
    int rfd, wfd;              /* -1 when none */
    uint32_t capacity;
};

#define PIPE_POOL_MAX 64
/* A worker's empty pipes of one size, kept for the next connection (pipes.py's PipePool) */
struct pipe_pool {
    int size;                  /* F_SETPIPE_SZ asked; 0: the kernel's default */
    int keep;                  /* empty pipes kept at most */
    int count;
    struct pipe_buf pipes[PIPE_POOL_MAX];
};

/* How the clients of listeners with one set of settings are connected and relayed
 * (plans.py's Route): its targets, timeouts, PROXY header, TCP options and pipes. Its
 * connect and idle timeouts are its own, so its timed lists are too: each is in deadline
 * order (a FIFO of connects, an LRU of idle relays). */
struct route {
    int index;
    struct group *group;
    int64_t connect_timeout_ns, idle_timeout_ns; /* 0: none */
    int proxy_protocol;        /* 0, 1 or 2 */
    int noptions;
    int options[MAX_OPTIONS][3]; /* (level, option, value) for TCP ends */
    struct pipe_pool *pool;
    struct link connecting, idle;
};

/* -- a listener the engine accepts on (it never closes the fd) -- */
struct listener {
    struct watch watch;
    int fd, family, index, route;
    int row;                   /* its index among the master's listeners (its counter row), or -1 */
    int source_limit;          /* --connections-max-per-source of its settings; 0: none */
    bool registered;
    bool oobinline;            /* set on the listener: accepted sockets inherit it */
    int nclient_options;       /* setsockopt(2) on each client: those not inherited */
    int client_options[MAX_OPTIONS][3];
    /* --access-log: the file's descriptor (the worker's, kept at this number across a
     * reopen), or -1; written with send(2) when it is a socket */
    int log_fd;
    bool log_sock;
    enum access_log_format log_format;
    char *log_name;            /* the listener's name in its lines (UTF-8) */
    size_t log_name_len;
};

/* Per socket of a connection: what epoll said and we have not used up yet (edge
 * triggered: a flag stays set until a call says EAGAIN). */
struct sock_state {
    bool readable, writable, urgent, oobinline, hangup;
};

struct direction {
    struct pipe_buf pipe;
    uint32_t pending;          /* bytes in the pipe */
    bool eof;                  /* the source has sent EOF */
    bool done;                 /* EOF passed on: finished */
    bool bulk;                 /* a read filled the copy buffer: splice from now on */
    uint64_t moved;            /* bytes delivered to the destination */
    size_t counter;            /* slot-relative offset of its byte counter */
    size_t row_counter;        /* and of its target row's, or 0: none */
};

enum conn_state {
    CONN_RESOLVING = 1,        /* waiting for hooks.resolve's answer */
    CONN_CONNECTING,           /* connect(2) under way */
    CONN_RETRY_WAIT,           /* out of descriptors: socket(2) retried later */
    CONN_RELAYING,
    CONN_CLOSED,               /* fds closed, struct freed after the batch */
};

/* How a connection ends: a clean close (each peer gets its FIN), or an abort (both sockets
 * closed with SO_LINGER 0, so a TCP peer gets an RST: splice.py's module docstring). */
enum end_how { END_NORMAL = 0, END_ABORT };

/* What admission_admit() gives a connection and admission_release() takes back: one token
 * for the global and the per-source caps (admission.py's): the per-source row it counts
 * in (>= 0), TOKEN_ADMITTED for a unit of the global cap alone, or NO_TOKEN. */
#define TOKEN_ADMITTED (-1)
#define NO_TOKEN (-65536)

typedef struct conn {
    struct link all;           /* engine->conns */
    struct link timed;         /* its route's connect FIFO (connecting) or idle LRU (relaying) */
    struct link queued;        /* run queue, resolve queue, retry list or graveyard */
    struct watch wclient, wtarget;
    uint8_t state;
    bool in_runq, resolve_asked, counted_relay;
    bool no_address, resolve_failing; /* its last failure: no address to try (no-target) */
    int8_t end;                /* why it ends (enum end_reason), -1 until known */
    bool end_by_client;        /* a relay's end came from the client's side */
    int64_t connected_ns;      /* when its target connected, 0 before */
    int client_fd, target_fd;
    struct sock_state cs, ts;
    struct direction to_target, to_client;
    struct listener *listener;
    struct route *route;
    uint16_t *order;           /* failover order (groups of several targets) */
    uint16_t steps, step;
    int target;                /* index in the group of the target being tried, -1 before */
    struct sockaddr_storage *addrs; /* resolved addresses of a host-name target */
    int naddrs, next_addr;
    int error;                 /* the last attempt's errno */
    uint64_t token;            /* hooks.resolve's token */
    int64_t started_ns, deadline_ns, active_ns;
    int admission;             /* its admission token (above) */
    size_t target_row;         /* slot-relative offset of the row of the target it is
                                  connected to, counted in its T_ACTIVE; 0: none */
    socklen_t peerlen;
    union {
        struct sockaddr sa;
        struct sockaddr_in in4;
        struct sockaddr_in6 in6;
        struct sockaddr_un un;
    } peer;
} conn;

/* -- datagram listeners (UDP, unix datagram) and their sessions: datagram.c -- */
struct session;
struct dlistener {
    struct watch watch;        /* WATCH_DATAGRAM */
    int fd, family, index, route, row; /* row: its counter row among the master's, or -1 */
    int source_limit;          /* --connections-max-per-source; 0: none */
    bool registered;
    int64_t timeout_ns;        /* --datagram-timeout; 0: none */
    uint64_t replies_max;      /* --datagram-replies; 0: unlimited */
    struct link sessions;      /* its sessions, least recently active first */
    struct session *held;      /* backpressure: whose datagram waits for its target */
    char *held_data;
    size_t held_len;
};

typedef union {
    struct sockaddr sa;
    struct sockaddr_in in4;
    struct sockaddr_in6 in6;
    struct sockaddr_un un;
} peer_address;

struct session {
    struct watch watch;        /* WATCH_SESSION */
    struct link lru;           /* its listener's sessions, or the graveyard once ended */
    struct session *next;      /* hash chain */
    struct dlistener *owner;   /* NULL once ended */
    int fd, target, admission;
    uint32_t hash;
    uint64_t replies;
    int64_t active_ns;         /* its last datagram either way */
    socklen_t peerlen;
    peer_address peer;
};

#define COPY_SIZE_DEFAULT 0
#define COPY_SIZE_MAX (1 << 20)

typedef struct engine {
    PyObject_HEAD
    int epfd, timerfd;
    struct watch timer_watch;
    bool closed, dispatching, accepting, draining, drained_reported, queue_on_limit;
    bool connects_begun;       /* this batch left a connect in progress */
    /* shared mapping */
    Py_buffer memory;
    bool have_memory;
    char *base;
    struct layout lay;
    size_t slot_index;
    char *slot;
    /* configuration */
    struct listener *listeners;
    int nlisteners;
    struct route *routes;
    int nroutes;
    struct group *groups;
    int ngroups;
    struct pipe_pool *pools;
    int npools;
    int copy_size;             /* small reads through copybuf (0: always splice) */
    char *copybuf;
    int fd_ceiling;
    struct histogram connect_hist, connection_hist;
    /* connections */
    struct link conns, runq, resolveq, retryq, graveyard;
    long open;                 /* admitted and not yet closed */
    uint64_t next_token;
    /* the held client: at the cap in queue mode (held_waiting: counted in WAITERS), or
     * for a busy admission mutex in either mode (retried at busy_retry_ns) */
    int held_fd;
    bool held_waiting;
    struct listener *held_listener;
    union {
        struct sockaddr sa;
        struct sockaddr_in6 in6;
        struct sockaddr_un un;
    } held_peer;
    socklen_t held_peerlen;
    long pipes_in_use;
    /* timers (CLOCK_MONOTONIC ns; 0 = none) */
    int64_t now_ns, armed_ns, accept_resume_ns, busy_retry_ns, wake_now;
    /* hooks */
    PyObject *hook_resolve, *hook_event, *hook_idle, *hook_drained, *hook_capacity;
    bool want_idle, want_drained, want_capacity;
    uint32_t capacity_seq;
    struct event_state events[EVENT_KINDS];
    int64_t events_due_ns;
    PyObject *error_type, *error_value, *error_tb; /* first exception from a hook */
    /* datagram listeners and their sessions (datagram.c) */
    struct dlistener *dlisteners;
    int ndlisteners;
    struct session **buckets;  /* sessions by (listener, client address) */
    size_t nbuckets;           /* a power of two, or 0 */
    long nsessions;
    struct link dead_sessions; /* ended during this batch, freed after it */
    char *dgbuf;               /* one datagram at a time, read and sent from here */
    size_t dgbuf_size;
    char *logbuf;              /* one access-log line at a time */
    size_t logbuf_size;
    /* statistics for tests */
    uint64_t stat_sessions, stat_dispatches, stat_events, stat_pumps, stat_timer_fires;
} engine;

/* Slot words: plain 64-bit stores and loads that the master reads concurrently. */
static inline int64_t *slot_word(engine *e, size_t offset) { return (int64_t *)(e->slot + offset); }
static inline void slot_add(engine *e, size_t offset, int64_t n)
{
    int64_t *word = slot_word(e, offset);
    __atomic_store_n(word, __atomic_load_n(word, __ATOMIC_RELAXED) + n, __ATOMIC_RELAXED);
}
/* Slot-relative offsets of a listener's and a target's counter rows (0: it has none). */
static inline size_t listener_row(engine *e, const struct listener *l)
{
    return l->row >= 0 && e->lay.listener_rows ? e->lay.listener_rows +
        (size_t)l->row * e->lay.row_words * 8 : 0;
}
static inline size_t target_row(engine *e, int row)
{
    return row >= 0 && e->lay.target_rows ? e->lay.target_rows +
        (size_t)row * e->lay.row_words * 8 : 0;
}
/* A listener's refusal counted in its row (cap, per_source, busy, no_target). */
static inline void count_refusal(engine *e, const struct listener *l, enum listener_refusal why)
{
    size_t row = listener_row(e, l);
    if (row)
        slot_add(e, row + e->lay.listener_refused + 8 * (size_t)why, 1);
}
/* A word of the target table's row `row` (any process writes them: relaxed atomics). */
static inline int64_t *table_word(engine *e, int row, size_t field)
{
    return (int64_t *)(e->base + e->lay.targets + (size_t)row * e->lay.target_row_bytes + field);
}

/* loop.c */
int64_t monotonic_ns(void);
int loop_init(engine *e);
int loop_dispatch(engine *e);
void timers_update(engine *e);
void runq_push(engine *e, conn *c);
void engine_free_graveyard(engine *e);
int epoll_add(engine *e, int fd, uint32_t events, struct watch *watch);

/* admission.c */
enum admit_result { ADMITTED = 0, REFUSED_CAP, REFUSED_SOURCE, REFUSED_BUSY };
enum admit_result admission_admit(engine *e, const struct sockaddr *peer, socklen_t len,
                                  int limit, int *token);
void admission_release(engine *e, int token);
void admission_wait_begin(engine *e);
void admission_wait_end(engine *e);
uint64_t source_hash(const uint8_t *key);

/* accept.c */
int listeners_register(engine *e);
void listeners_unregister(engine *e);
void on_listener_ready(engine *e, struct listener *l);
void accept_resume(engine *e);
void admit_held(engine *e);
int setup_listener_options(engine *e, struct listener *l);

/* connect.c */
void connect_start(engine *e, conn *c);
void connect_on_target_event(engine *e, conn *c, uint32_t events);
void connect_expire(engine *e, struct route *r, int64_t now);
void connect_retry_waiting(engine *e);
void connect_resolved(engine *e, conn *c, struct sockaddr_storage *addrs, int count);
void connect_resolve_failed(engine *e, conn *c, int error);
void connect_cancel(engine *e, conn *c);
int group_local_order(engine *e, struct group *g, uint16_t *order);
bool local_errno(int error);
#define COOLDOWN_NS 5000000000LL /* targets.py's COOLDOWN: a failed target is tried last */
PyObject *sockaddr_text(const struct sockaddr *sa, socklen_t len);
#define ADDRESS_TEXT_MAX (sizeof(struct sockaddr_un) + 8)
size_t address_text(char *out, size_t size, const struct sockaddr *sa, socklen_t len);

/* relay.c */
void relay_start(engine *e, conn *c);
void relay_on_event(engine *e, conn *c, bool client_side, uint32_t events);
void relay_pump(engine *e, conn *c);
void conn_close(engine *e, conn *c, enum end_how how, int error);
void idle_expire(engine *e, struct route *r, int64_t now);
void pipe_pools_close(engine *e);
bool peer_gone_errno(int error);

/* log_lines.c */
void access_log_conn(engine *e, conn *c);
void access_log_refused(engine *e, const struct listener *l, const struct sockaddr *peer,
                        socklen_t peerlen, enum end_reason end);
int access_log_setup(engine *e);

/* datagram.c */
int parse_datagram_listeners(engine *e, PyObject *listeners, Py_ssize_t buffer_size);
int datagram_register(engine *e);
void datagram_unregister(engine *e);
void datagram_on_listener(engine *e, struct dlistener *l);
void datagram_on_session(engine *e, struct session *s, uint32_t events);
void datagram_expire(engine *e, int64_t now);
int64_t datagram_next_deadline(engine *e);
void datagram_end_all(engine *e);
void datagram_free(engine *e);

/* proxy_header.c */
int proxy_header_encode(int version, const struct sockaddr *client, const struct sockaddr *local,
                        char *out, size_t size);
#define PROXY_HEADER_MAX 232

/* config.c */
int parse_layout(engine *e, PyObject *layout);
struct route_defaults {          /* the Engine's keyword arguments: for routes that are a
                                    plain sequence of targets, and what others leave out */
    double connect_timeout, idle_timeout;
    int proxy_protocol, pipe_size, pipe_keep;
    PyObject *tcp_options;
};
int parse_routes(engine *e, PyObject *routes, const struct route_defaults *defaults);
int parse_listeners(engine *e, PyObject *listeners);
PyObject *layout_dict(engine *e);
PyObject *layout_names(void);
int to_sockaddr(int family, PyObject *obj, struct sockaddr_storage *ss, socklen_t *len);
int target_address(const struct target *t, struct sockaddr_storage *ss);
int64_t timeout_ns(double seconds);
int64_t timer_slack(int64_t timeout_ns);

/* hooks.c */
void event_report(engine *e, enum event_code code, int error, int index,
                  const struct sockaddr *peer, socklen_t peerlen, PyObject *target);
void observe(engine *e, const struct histogram *h, int64_t ns);
int engine_enter(engine *e);
void engine_keep_error(engine *e);
PyObject *engine_leave(engine *e, PyObject *result);

/* engine.c */
extern PyTypeObject EngineType;

#endif
