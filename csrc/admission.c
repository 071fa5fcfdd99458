/* Admission against the shared mapping: the global cap and the per-source cap.
 *
 * The protocol of shared/admission.py and shared/per_source.py, which the Python engine
 * follows too (workers of both engines share one exact cap): decisions are made under one
 * process-shared robust mutex; the truth is each slot's HELD word and its column of
 * per-source counts, written only by the slot's worker (the master zeroes them after
 * reaping it). Release decrements without the lock. Never logs.
 *
 * The lock: a trylock, then SPIN_TRIES more (a running holder is out within
 * microseconds); a holder still in was most likely preempted, so then sleep on it in the
 * kernel (pthread_mutex_clocklock, the GIL released), which lets it run, for at most
 * LOCK_BUDGET_NS, and past that refuse the client as busy (admission.py's policy).
 *
 * Per-source table: open addressing with linear probing from source_hash(key), which is
 * per_source.py's source_row before the modulo. A row whose counts over the live slots are
 * all zero is free for reuse; a never-used row (all-zero key) ends a probe. A row is
 * claimed with DIRTY = row + 1 set while its key is written; a locker that finds DIRTY set
 * overwrites that row's key with all ones (no client has it).
 */
#include "engine.h"

#include <errno.h>
#include <limits.h>
#include <linux/futex.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define KEY_SIZE 16
#define SPIN_TRIES 16             /* trylocks after the first, before sleeping on the mutex */
#define LOCK_BUDGET_NS 50000000   /* 50 ms: then refuse as busy rather than stall the loop */

static const uint8_t cleared_key[KEY_SIZE] = {
    0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
    0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
};
static const uint8_t empty_key[KEY_SIZE];

static inline int64_t *header_word(engine *e, size_t offset) { return (int64_t *)(e->base + offset); }
static inline int64_t load64(const int64_t *p) { return __atomic_load_n(p, __ATOMIC_RELAXED); }

static inline void cpu_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

uint64_t source_hash(const uint8_t *key)
{
    uint64_t lo, hi;
    memcpy(&lo, key, 8);
    memcpy(&hi, key + 8, 8);
#if __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
    lo = __builtin_bswap64(lo);
    hi = __builtin_bswap64(hi);
#endif
    /* splitmix64's finalizer: every input bit reaches the low bits a modulo keeps (the
     * IPv4 part of a key is in the top half of hi) */
    uint64_t h = (lo * UINT64_C(0x9E3779B97F4A7C15)) ^ hi;
    h = (h ^ (h >> 30)) * UINT64_C(0xBF58476D1CE4E5B9);
    h = (h ^ (h >> 27)) * UINT64_C(0x94D049BB133111EB);
    return h ^ (h >> 31);
}

/* The 16-byte key of a client's IP address (IPv4 as v4-mapped IPv6); false if none. */
static bool source_key(const struct sockaddr *peer, socklen_t len, uint8_t *key)
{
    if (peer->sa_family == AF_INET && len >= sizeof(struct sockaddr_in)) {
        memset(key, 0, 10);
        key[10] = key[11] = 0xff;
        memcpy(key + 12, &((const struct sockaddr_in *)peer)->sin_addr, 4);
        return true;
    }
    if (peer->sa_family == AF_INET6 && len >= sizeof(struct sockaddr_in6)) {
        memcpy(key, &((const struct sockaddr_in6 *)peer)->sin6_addr, KEY_SIZE);
        return true;
    }
    return false;
}

static pthread_mutex_t *admission_mutex(engine *e) { return (pthread_mutex_t *)(e->base + e->lay.mutex); }

static inline uint8_t *source_row(engine *e, int64_t row)
{
    return (uint8_t *)e->base + e->lay.source_table + (size_t)row * e->lay.source_row_bytes;
}

static inline uint16_t *source_counts(engine *e, int64_t row)
{
    return (uint16_t *)(source_row(e, row) + e->lay.source_counts);
}

static void write_key(engine *e, int64_t row, const uint8_t *key)
{
    int64_t *dirty = header_word(e, e->lay.source_dirty);
    __atomic_store_n(dirty, row + 1, __ATOMIC_RELAXED);
    __atomic_signal_fence(__ATOMIC_SEQ_CST);
    memcpy(source_row(e, row), key, KEY_SIZE);
    __atomic_signal_fence(__ATOMIC_SEQ_CST);
    __atomic_store_n(dirty, 0, __ATOMIC_RELAXED);
}

/* Under the lock, after its holder died: a key it was writing may be torn. */
static void repair_dirty(engine *e)
{
    if (!e->lay.source_table)
        return;
    int64_t *dirty = header_word(e, e->lay.source_dirty);
    int64_t row = load64(dirty);
    int64_t entries = load64(header_word(e, e->lay.source_entries));
    if (row > 0 && row <= entries)
        memcpy(source_row(e, row - 1), cleared_key, KEY_SIZE);
    __atomic_store_n(dirty, 0, __ATOMIC_RELAXED);
}

/* After EOWNERDEAD: its holder died inside admit(). Counts need no repair (its words are
 * zeroed when the master reaps it), only a key it may have torn. */
static int recover(engine *e, pthread_mutex_t *mutex)
{
    repair_dirty(e);
    pthread_mutex_consistent(mutex);
    return 0;
}

/* 0 when locked; EBUSY (ETIMEDOUT) or ENOTRECOVERABLE: refuse, never guess. */
static int lock(engine *e)
{
    pthread_mutex_t *mutex = admission_mutex(e);
    int rc = pthread_mutex_trylock(mutex);
    for (int tries = 0; rc == EBUSY && tries < SPIN_TRIES; tries++) {
        cpu_relax();
        rc = pthread_mutex_trylock(mutex);
    }
    if (rc == EBUSY) {
        /* Held longer than a few admissions take: its holder was likely preempted. Sleep
         * in the kernel, so it gets the CPU, until unlocked or the budget is spent. */
        struct timespec deadline;
        clock_gettime(CLOCK_MONOTONIC, &deadline);
        deadline.tv_nsec += LOCK_BUDGET_NS;
        if (deadline.tv_nsec >= 1000000000) {
            deadline.tv_sec++;
            deadline.tv_nsec -= 1000000000;
        }
        Py_BEGIN_ALLOW_THREADS
        rc = pthread_mutex_clocklock(mutex, CLOCK_MONOTONIC, &deadline);
        Py_END_ALLOW_THREADS
    }
    if (rc == EOWNERDEAD)
        return recover(e, mutex);
    return rc;
}

static int64_t held_total(engine *e, int64_t high_water)
{
    int64_t total = 0;
    const char *slot = e->base + e->lay.slots + e->lay.held;
    for (int64_t i = 0; i < high_water; i++, slot += e->lay.slot_bytes)
        total += load64((const int64_t *)slot);
    return total;
}

static uint32_t row_sum(engine *e, int64_t row, int64_t high_water)
{
    const uint16_t *counts = source_counts(e, row);
    uint32_t sum = 0;
    for (int64_t i = 0; i < high_water; i++)
        sum += __atomic_load_n(&counts[i], __ATOMIC_RELAXED);
    return sum;
}

/* The row for `key`: its own, else a free one now holding it; -1 if the table is full.
 * Also turns free rows just before the never-used row that ended the probe back into
 * never-used ones, so probes stay short however many sources have come and gone. */
static int64_t source_find(engine *e, const uint8_t *key, int64_t high_water)
{
    int64_t entries = load64(header_word(e, e->lay.source_entries));
    if (entries <= 0)
        return -1;
    int64_t row = (int64_t)(source_hash(key) % (uint64_t)entries);
    int64_t reusable = -1, end = -1;
    for (int64_t step = 0; step < entries; step++) {
        const uint8_t *stored = source_row(e, row);
        if (memcmp(stored, key, KEY_SIZE) == 0)
            return row;
        if (memcmp(stored, empty_key, KEY_SIZE) == 0) {
            end = row;
            break;
        }
        if (reusable < 0 && row_sum(e, row, high_water) == 0)
            reusable = row;
        row = row + 1 == entries ? 0 : row + 1;
    }
    if (end >= 0) {
        /* Free rows right before the end of a probe belong to no live key's probe. */
        int64_t before = end;
        for (int64_t step = 1; step < entries; step++) {
            before = before == 0 ? entries - 1 : before - 1;
            if (before == reusable || row_sum(e, before, high_water) != 0 ||
                memcmp(source_row(e, before), empty_key, KEY_SIZE) == 0)
                break;
            write_key(e, before, empty_key);
        }
    }
    int64_t claim = reusable >= 0 ? reusable : end;
    if (claim >= 0)
        write_key(e, claim, key);
    return claim;
}

/* Admit one connection from `peer`, under the global cap and, with `limit` > 0 and a peer
 * with an IP address, its source's limit (`limit`: its listener's; the count is the
 * source's, across listeners). Global first, then per-source. On ADMITTED, *token is what
 * admission_release() takes back. */
enum admit_result admission_admit(engine *e, const struct sockaddr *peer, socklen_t len,
                                  int limit, int *token)
{
    *token = NO_TOKEN;
    uint8_t key[KEY_SIZE];
    bool per_source = limit > 0 && e->lay.source_table && source_key(peer, len, key);
    if (lock(e) != 0)
        return REFUSED_BUSY;
    enum admit_result result = ADMITTED;
    int row = TOKEN_ADMITTED;
    int64_t high_water = load64(header_word(e, e->lay.slot_high_water));
    if (high_water > (int64_t)e->lay.max_slots)
        high_water = (int64_t)e->lay.max_slots;
    if ((int64_t)e->slot_index >= high_water)
        high_water = (int64_t)e->slot_index + 1;
    if (held_total(e, high_water) >= load64(header_word(e, e->lay.capacity))) {
        result = REFUSED_CAP;
    } else if (per_source) {
        int64_t found = source_find(e, key, high_water);
        uint16_t *own;
        if (found < 0 || (int64_t)row_sum(e, found, high_water) >= limit ||
            *(own = &source_counts(e, found)[e->slot_index]) == UINT16_MAX) {
            result = REFUSED_SOURCE;
        } else {
            __atomic_store_n(own, (uint16_t)(*own + 1), __ATOMIC_RELAXED);
            row = (int)found;
        }
    }
    if (result == ADMITTED) {
        int64_t *held = slot_word(e, e->lay.held);
        __atomic_store_n(held, load64(held) + 1, __ATOMIC_RELAXED);
        *token = row;
    }
    pthread_mutex_unlock(admission_mutex(e));
    return result;
}

/* Give back what admission_admit() gave: the connection's fds are closed already, so a
 * kill before this leaves HELD high until the master reaps us, never low. */
void admission_release(engine *e, int token)
{
    if (token == NO_TOKEN)
        return;
    if (token >= 0) {
        uint16_t *own = &source_counts(e, token)[e->slot_index];
        __atomic_store_n(own, (uint16_t)(*own - 1), __ATOMIC_RELAXED);
    }
    int64_t *held = slot_word(e, e->lay.held);
    __atomic_store_n(held, load64(held) - 1, __ATOMIC_RELAXED);
    if (!e->lay.waiters)
        return;
    /* The HELD store before the WAITERS load (a store-load order only a full fence gives):
     * a waiter counts itself in WAITERS before it tries admit(), so either it sees our
     * HELD or we see it waiting and wake it. */
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    uint32_t *waiters = (uint32_t *)(e->base + e->lay.waiters);
    if (__atomic_load_n(waiters, __ATOMIC_RELAXED) == 0)
        return;
    uint32_t *seq = (uint32_t *)(e->base + e->lay.capacity_seq);
    __atomic_fetch_add(seq, 1, __ATOMIC_SEQ_CST);
    syscall(SYS_futex, seq, FUTEX_WAKE, INT_MAX, NULL, NULL, 0);
}

/* Queue mode: count this worker among the waiters (until admission_wait_end), WAITING
 * raised after the add: a kill in between only leaves WAITERS high (admission.py). */
void admission_wait_begin(engine *e)
{
    uint32_t *waiters = (uint32_t *)(e->base + e->lay.waiters);
    __atomic_fetch_add(waiters, 1, __ATOMIC_SEQ_CST);
    __atomic_store_n(slot_word(e, e->lay.waiting), 1, __ATOMIC_SEQ_CST);
}

void admission_wait_end(engine *e)
{
    __atomic_store_n(slot_word(e, e->lay.waiting), 0, __ATOMIC_SEQ_CST);
    uint32_t *waiters = (uint32_t *)(e->base + e->lay.waiters);
    __atomic_fetch_sub(waiters, 1, __ATOMIC_SEQ_CST);
}
