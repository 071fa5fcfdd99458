/* Datagram listeners (UDP, unix datagram): their clients' datagrams through sessions.
 *
 * The twin of datagram.py, datagram_listener.py and datagram_session.py, which stay the
 * reference (and relay what the engine is not given: host-name targets, the access log).
 * A datagram from a client address the engine has no session for opens one: a unit of
 * the connection cap and of its source's (admission.c; over either it is dropped and
 * counted, there is nothing to refuse), and a socket of its own connected to a target of
 * the listener's route (UDP: an ephemeral port of its own; unix: autobound to an abstract
 * name of its own), so the target's replies come back to it alone. Replies go to the
 * client from the listening socket. Sessions are found in one hash table by (listener,
 * client address); each listener keeps its sessions in least-recently-active order, so
 * --datagram-timeout expires them from the head (met late by up to timeout/8, as the
 * Python sweep is). --datagram-replies ends a session after that many replies.
 *
 * A datagram is read into the engine's buffer and sent on from it at once. One a target
 * cannot take now (EAGAIN: a unix target's queue is full) is copied and held while the
 * listener is not read, and sent when the session's socket is writable: backpressure.
 * A datagram the kernel refuses is counted by reason in the listener's row and reported
 * (rate-limited) through hooks.on_event; an ICMP error from the target ends the session
 * and cools its target down, so the client's next datagram may go to another. Nothing
 * here ends the worker. Sessions ended during a batch are freed after it.
 */
#include "engine.h"

#include <errno.h>
#include <string.h>
#include <sys/epoll.h>
#include <unistd.h>

#define READS_PER_WAKEUP 64   /* datagrams read from a listener per readable event */
#define REPLIES_PER_WAKEUP 16 /* replies read from a session per readable event */
#define UNIX_OVERHEAD 32      /* unix(7): a datagram must fit sk_sndbuf - 32 */
#define SEND_BUFFER_SLACK 4096

enum session_end { END_TIMEOUT, END_REPLIES, END_ERROR, END_STOPPED };

/* -- configuration ---------------------------------------------------------------------- */

/* `listeners`: [(fd, route, source_limit, row, replies_max, timeout_seconds), ...]. */
int parse_datagram_listeners(engine *e, PyObject *listeners, Py_ssize_t buffer_size)
{
    list_init(&e->dead_sessions);
    if (listeners == NULL)
        return 0;
    PyObject *seq = PySequence_Fast(listeners, "datagram_listeners must be a sequence");
    if (seq == NULL)
        return -1;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    e->dlisteners = PyMem_Calloc((size_t)n + 1, sizeof *e->dlisteners);
    if (e->dlisteners == NULL || (n && buffer_size < 65536) ||
        (n && (e->dgbuf = PyMem_Malloc((size_t)buffer_size)) == NULL)) {
        Py_DECREF(seq);
        if (!PyErr_Occurred() && buffer_size < 65536)
            PyErr_SetString(PyExc_ValueError, "datagram_buffer must hold 65536 bytes");
        else if (!PyErr_Occurred())
            PyErr_NoMemory();
        return -1;
    }
    e->dgbuf_size = (size_t)buffer_size;
    for (Py_ssize_t i = 0; i < n; i++) {
        struct dlistener *l = &e->dlisteners[i];
        unsigned long long replies = 0;
        double timeout = 0;
        list_init(&l->sessions);
        l->row = -1;
        if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(seq, i), "iiiiKd", &l->fd, &l->route,
                              &l->source_limit, &l->row, &replies, &timeout))
            goto fail;
        if (l->route < 0 || l->route >= e->nroutes || l->source_limit < 0 ||
            (l->row >= 0 && (size_t)l->row >= e->lay.max_listeners)) {
            PyErr_Format(PyExc_ValueError, "datagram listener fd %d: no route %d, or a "
                         "negative limit", l->fd, l->route);
            goto fail;
        }
        struct group *g = e->routes[l->route].group;
        for (int t = 0; t < g->count; t++)
            if (g->targets[t].family == 0 || g->count > UINT16_MAX) {
                PyErr_SetString(PyExc_ValueError, "datagram targets must be addresses");
                goto fail;
            }
        socklen_t len = sizeof l->family;
        if (getsockopt(l->fd, SOL_SOCKET, SO_DOMAIN, &l->family, &len) < 0) {
            PyErr_SetFromErrno(PyExc_OSError);
            goto fail;
        }
        l->replies_max = replies;
        l->timeout_ns = timeout_ns(timeout);
        l->watch.kind = WATCH_DATAGRAM;
        l->index = (int)i;
        e->ndlisteners = (int)i + 1;
    }
    Py_DECREF(seq);
    return 0;
fail:
    Py_DECREF(seq);
    return -1;
}

static int listener_watch(engine *e, struct dlistener *l)
{
    if (l->registered || l->held != NULL)
        return 0;
    if (epoll_add(e, l->fd, EPOLLIN, &l->watch) < 0)
        return -1;
    l->registered = true;
    return 0;
}

static void listener_unwatch(engine *e, struct dlistener *l)
{
    if (l->registered) {
        epoll_ctl(e->epfd, EPOLL_CTL_DEL, l->fd, NULL);
        l->registered = false;
    }
}

int datagram_register(engine *e)
{
    for (int i = 0; i < e->ndlisteners; i++)
        if (listener_watch(e, &e->dlisteners[i]) < 0)
            return -1;
    return 0;
}

void datagram_unregister(engine *e)
{
    for (int i = 0; i < e->ndlisteners; i++)
        listener_unwatch(e, &e->dlisteners[i]);
}

/* -- counters ------------------------------------------------------------------------------ */

/* Slot-relative offset of a datagram listener's row field, or 0: it has no row. */
static size_t row_field(engine *e, const struct dlistener *l, size_t field)
{
    if (l->row < 0 || !e->lay.listener_rows)
        return 0;
    return e->lay.listener_rows + (size_t)l->row * e->lay.row_words * 8 + field;
}

static void row_add(engine *e, const struct dlistener *l, size_t field, int64_t n)
{
    size_t at = row_field(e, l, field);
    if (at)
        slot_add(e, at, n);
}

static void drop(engine *e, const struct dlistener *l, enum datagram_drop why, int64_t count,
                 enum event_code code, int error, const struct sockaddr *peer, socklen_t peerlen)
{
    row_add(e, l, e->lay.dg_dropped + 8 * (size_t)why, count);
    event_report(e, code, error, l->index, peer, peerlen, NULL);
}

/* A datagram of session `s` its target did not take: reported as (client, target). */
static void drop_at_target(engine *e, const struct session *s, enum event_code code, int error)
{
    const struct dlistener *l = s->owner;
    row_add(e, l, e->lay.dg_dropped + 8 * DG_SEND_ERROR, 1);
    PyObject *target = e->routes[l->route].group->targets[s->target].object;
    event_report(e, code, error, l->index, &s->peer.sa, s->peerlen, target);
}

/* -- the session table ------------------------------------------------------------------------ */

static uint32_t peer_hash(const struct dlistener *l, const void *peer, socklen_t len)
{
    uint32_t h = 2166136261u ^ (uint32_t)l->index; /* FNV-1a */
    const uint8_t *p = peer;
    for (socklen_t i = 0; i < len; i++)
        h = (h ^ p[i]) * 16777619u;
    return h;
}

static struct session *session_find(engine *e, const struct dlistener *l, const void *peer,
                                    socklen_t len, uint32_t hash)
{
    if (!e->nbuckets)
        return NULL;
    for (struct session *s = e->buckets[hash & (e->nbuckets - 1)]; s != NULL; s = s->next)
        if (s->hash == hash && s->owner == l && s->peerlen == len && !memcmp(&s->peer, peer, len))
            return s;
    return NULL;
}

/* Room for one more session in the table (doubling it past one session per bucket). */
static int table_reserve(engine *e)
{
    if ((size_t)e->nsessions < e->nbuckets)
        return 0;
    size_t size = e->nbuckets ? e->nbuckets * 2 : 64;
    struct session **buckets = PyMem_Calloc(size, sizeof *buckets);
    if (buckets == NULL)
        return -1;
    for (size_t i = 0; i < e->nbuckets; i++)
        for (struct session *s = e->buckets[i], *next; s != NULL; s = next) {
            next = s->next;
            s->next = buckets[s->hash & (size - 1)];
            buckets[s->hash & (size - 1)] = s;
        }
    PyMem_Free(e->buckets);
    e->buckets = buckets;
    e->nbuckets = size;
    return 0;
}

static void table_remove(engine *e, struct session *s)
{
    struct session **at = &e->buckets[s->hash & (e->nbuckets - 1)];
    while (*at != NULL && *at != s)
        at = &(*at)->next;
    if (*at == s)
        *at = s->next;
}

static void touch(engine *e, struct session *s)
{
    s->active_ns = e->now_ns;
    list_del(&s->lru);
    list_add_tail(&s->owner->sessions, &s->lru);
}

/* -- ending ------------------------------------------------------------------------------------ */

static void release_held(engine *e, struct dlistener *l)
{
    struct session *s = l->held;
    if (s == NULL)
        return;
    l->held = NULL;
    PyMem_Free(l->held_data);
    l->held_data = NULL;
    if (s->fd >= 0) {
        struct epoll_event ev = {.events = EPOLLIN, .data.ptr = &s->watch};
        epoll_ctl(e->epfd, EPOLL_CTL_MOD, s->fd, &ev);
    }
    if (!e->draining && !e->closed)
        listener_watch(e, l);
}

/* Where every session ends, once: its socket closed, its unit given back. */
static void session_end(engine *e, struct session *s, enum session_end why)
{
    struct dlistener *l = s->owner;
    if (l == NULL)
        return;
    (void)why; /* the access log's end=, once the engine writes it */
    if (l->held == s) {
        row_add(e, l, e->lay.dg_dropped + 8 * DG_SEND_ERROR, 1); /* what it held goes nowhere */
        release_held(e, l);
    }
    table_remove(e, s);
    list_del(&s->lru);
    if (s->fd >= 0)
        close(s->fd); /* also leaves the epoll */
    s->fd = -1;
    s->owner = NULL;
    admission_release(e, s->admission);
    row_add(e, l, e->lay.dg_sessions_active, -1);
    list_add_tail(&e->dead_sessions, &s->lru);
    if (--e->nsessions == 0) {
        /* what --exit-idle-time counts from (the Python engine's session_ended) */
        __atomic_store_n(slot_word(e, e->lay.last_activity_ns), monotonic_ns(), __ATOMIC_RELAXED);
        if (e->draining)
            e->want_drained = true;
    }
}

void datagram_end_all(engine *e)
{
    for (int i = 0; i < e->ndlisteners; i++) {
        struct dlistener *l = &e->dlisteners[i];
        while (!list_empty(&l->sessions))
            session_end(e, container_of(l->sessions.next, struct session, lru), END_STOPPED);
    }
}

void datagram_free(engine *e)
{
    datagram_end_all(e);
    for (int i = 0; i < e->ndlisteners; i++)
        listener_unwatch(e, &e->dlisteners[i]);
    PyMem_Free(e->buckets);
    e->buckets = NULL;
    e->nbuckets = 0;
}

/* -- opening ----------------------------------------------------------------------------------- */

/* Whether a session socket's error says the target is not there (an ICMP error on UDP, no
 * listener on a unix socket), rather than something of this machine. */
static bool refusal(int error)
{
    return error == ECONNREFUSED || error == EHOSTUNREACH || error == ENETUNREACH ||
           error == ENOENT || error == EPERM;
}

static void target_failed(engine *e, struct dlistener *l, int index, int error)
{
    struct target *t = &e->routes[l->route].group->targets[index];
    bool newly = t->cooling_until_ns <= e->now_ns;
    t->cooling_until_ns = e->now_ns + COOLDOWN_NS;
    if (newly)
        event_report(e, EVENT_DG_TARGET_FAILED, error, l->index, NULL, 0, t->object);
}

/* A socket connected to target `index`, bound to an address of its own; -1 (errno). */
static int session_socket(const struct target *t)
{
    int fd = socket(t->addr.ss_family, SOCK_DGRAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return -1;
    struct sockaddr_un autobind = {.sun_family = AF_UNIX};
    if ((t->addr.ss_family == AF_UNIX &&
         bind(fd, (struct sockaddr *)&autobind, sizeof(sa_family_t)) < 0) ||
        connect(fd, (const struct sockaddr *)&t->addr, t->addrlen) < 0) {
        int error = errno;
        close(fd);
        errno = error;
        return -1;
    }
    return fd;
}

/* Connect `s` to the first target of its listener's route that takes it. */
static int session_connect(engine *e, struct dlistener *l, struct session *s)
{
    struct group *g = e->routes[l->route].group;
    uint16_t one = 0, *order = &one;
    int steps = 1, error = 0;
    if (g->count > 1) {
        order = PyMem_Malloc(sizeof *order * (size_t)g->count);
        if (order == NULL)
            return ENOMEM;
        steps = group_local_order(e, g, order);
    }
    for (int i = 0; i < steps; i++) {
        int fd = session_socket(&g->targets[order[i]]);
        if (fd >= 0) {
            s->fd = fd;
            s->target = order[i];
            if (g->count > 1)
                g->targets[order[i]].cooling_until_ns = 0;
            break;
        }
        error = errno;
        if (local_errno(error))
            break;
        target_failed(e, l, order[i], error);
    }
    if (order != &one)
        PyMem_Free(order);
    return s->fd >= 0 ? 0 : error;
}

/* A session for a new client, or NULL (its datagram dropped and counted). */
static struct session *session_open(engine *e, struct dlistener *l, const peer_address *peer,
                                    socklen_t peerlen, uint32_t hash)
{
    int token;
    enum admit_result admitted = admission_admit(e, &peer->sa, peerlen, l->source_limit, &token);
    if (admitted != ADMITTED) {
        if (admitted == REFUSED_CAP)
            drop(e, l, DG_CAP, 1, EVENT_DG_CAP, 0, &peer->sa, peerlen);
        else if (admitted == REFUSED_SOURCE)
            drop(e, l, DG_PER_SOURCE, 1, EVENT_DG_SOURCE, 0, &peer->sa, peerlen);
        else
            drop(e, l, DG_BUSY, 1, EVENT_DG_BUSY, 0, &peer->sa, peerlen);
        return NULL;
    }
    struct session *s = table_reserve(e) < 0 ? NULL : PyMem_Calloc(1, sizeof *s);
    if (s == NULL) {
        admission_release(e, token);
        drop(e, l, DG_NO_SESSION, 1, EVENT_DG_NO_SESSION, ENOMEM, &peer->sa, peerlen);
        return NULL;
    }
    s->watch.kind = WATCH_SESSION;
    s->owner = l;
    s->fd = s->target = -1;
    s->admission = token;
    s->hash = hash;
    s->peerlen = peerlen;
    memcpy(&s->peer, peer, peerlen);
    s->next = e->buckets[hash & (e->nbuckets - 1)];
    e->buckets[hash & (e->nbuckets - 1)] = s;
    list_add_tail(&l->sessions, &s->lru);
    e->nsessions++;
    e->stat_sessions++;
    row_add(e, l, e->lay.dg_sessions, 1); /* counted opened, as the Python engine does */
    row_add(e, l, e->lay.dg_sessions_active, 1);
    int error = session_connect(e, l, s);
    if (error == 0 && epoll_add(e, s->fd, EPOLLIN, &s->watch) < 0)
        error = errno;
    if (error) {
        drop(e, l, DG_NO_SESSION, 1, EVENT_DG_NO_SESSION, error, &peer->sa, peerlen);
        session_end(e, s, END_ERROR);
        return NULL;
    }
    return s;
}

/* -- towards targets ----------------------------------------------------------------------------- */

/* Make room for a datagram of `size` bytes in a unix socket's send buffer (a unix datagram
 * must fit it whole: EMSGSIZE otherwise), as messages.py's grow_send_buffer. */
static bool grow_send_buffer(int fd, size_t size)
{
    int want = (int)(size + SEND_BUFFER_SLACK), have = 0;
    socklen_t len = sizeof have;
    return setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &want, sizeof want) == 0 &&
           getsockopt(fd, SOL_SOCKET, SO_SNDBUF, &have, &len) == 0 &&
           (size_t)have >= size + UNIX_OVERHEAD;
}

static void sent(engine *e, struct dlistener *l, size_t count)
{
    row_add(e, l, e->lay.dg_to_target, 1);
    row_add(e, l, e->lay.dg_bytes_to_target, (int64_t)count);
}

/* The kernel would not send a datagram of `s` to its target (not EAGAIN). */
static void send_failed(engine *e, struct session *s, const char *data, size_t count, int error)
{
    struct dlistener *l = s->owner;
    if (error == EMSGSIZE && l->family == AF_UNIX && grow_send_buffer(s->fd, count) &&
        send(s->fd, data, count, MSG_DONTWAIT | MSG_NOSIGNAL) >= 0) {
        sent(e, l, count);
        return;
    }
    drop_at_target(e, s, EVENT_DG_SEND_ERROR, error);
    if (refusal(error)) {
        target_failed(e, l, s->target, error);
        session_end(e, s, END_ERROR);
    }
}

/* A datagram its target cannot take now: held (copied) while the listener is not read. */
static void hold(engine *e, struct session *s, const char *data, size_t count)
{
    struct dlistener *l = s->owner;
    l->held_data = PyMem_Malloc(count ? count : 1);
    if (l->held_data == NULL) {
        drop(e, l, DG_SEND_ERROR, 1, EVENT_DG_SEND_ERROR, ENOMEM, &s->peer.sa, s->peerlen);
        return;
    }
    memcpy(l->held_data, data, count);
    l->held_len = count;
    l->held = s;
    listener_unwatch(e, l);
    struct epoll_event ev = {.events = EPOLLIN | EPOLLOUT, .data.ptr = &s->watch};
    epoll_ctl(e->epfd, EPOLL_CTL_MOD, s->fd, &ev);
}

void datagram_on_listener(engine *e, struct dlistener *l)
{
    char *buf = e->dgbuf;
    size_t size = e->dgbuf_size;
    for (int k = 0; k < READS_PER_WAKEUP && l->registered; k++) {
        peer_address peer;
        socklen_t peerlen = sizeof peer;
        ssize_t n = recvfrom(l->fd, buf, size, MSG_TRUNC | MSG_DONTWAIT, &peer.sa, &peerlen);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            if (errno != EAGAIN)
                event_report(e, EVENT_DG_READ_ERROR, errno, l->index, NULL, 0, NULL);
            return;
        }
        if (peerlen > sizeof peer)
            peerlen = sizeof peer;
        if ((size_t)n > size) {
            drop(e, l, DG_TRUNCATED, 1, EVENT_DG_TRUNCATED, (int)n, &peer.sa, peerlen);
            continue;
        }
        uint32_t hash = peer_hash(l, &peer, peerlen);
        struct session *s = session_find(e, l, &peer, peerlen, hash);
        if (s == NULL && (s = session_open(e, l, &peer, peerlen, hash)) == NULL)
            continue;
        touch(e, s);
        if (send(s->fd, buf, (size_t)n, MSG_DONTWAIT | MSG_NOSIGNAL) >= 0) {
            sent(e, l, (size_t)n);
        } else if (errno == EAGAIN) {
            hold(e, s, buf, (size_t)n);
            return;
        } else if (errno != EINTR) {
            send_failed(e, s, buf, (size_t)n, errno);
        } /* EINTR: a signal between the datagram and its send; it is lost as UDP may */
    }
}

/* -- back to clients ------------------------------------------------------------------------------ */

static void on_writable(engine *e, struct session *s)
{
    struct dlistener *l = s->owner;
    if (l->held != s)
        return;
    if (send(s->fd, l->held_data, l->held_len, MSG_DONTWAIT | MSG_NOSIGNAL) >= 0) {
        sent(e, l, l->held_len);
    } else if (errno == EAGAIN || errno == EINTR) {
        return;
    } else {
        int error = errno;
        char *data = l->held_data;
        size_t count = l->held_len;
        l->held_data = NULL; /* send_failed may end the session: keep the datagram */
        release_held(e, l);
        send_failed(e, s, data, count, error);
        PyMem_Free(data);
        return;
    }
    release_held(e, l);
}

void datagram_on_session(engine *e, struct session *s, uint32_t events)
{
    struct dlistener *l = s->owner;
    if (l == NULL)
        return; /* ended earlier in this batch */
    if (events & EPOLLOUT) {
        on_writable(e, s);
        if (s->owner == NULL)
            return;
    }
    if (!(events & (EPOLLIN | EPOLLERR | EPOLLHUP)))
        return;
    char *buf = e->dgbuf;
    size_t size = e->dgbuf_size;
    for (int k = 0; k < REPLIES_PER_WAKEUP; k++) {
        ssize_t n = recv(s->fd, buf, size, MSG_TRUNC | MSG_DONTWAIT);
        if (n < 0) {
            if (errno == EAGAIN)
                return;
            if (errno == EINTR)
                continue;
            /* ECONNREFUSED: an earlier datagram the target's host refused (an ICMP port
             * unreachable); anything else ends the session too. */
            int error = errno;
            drop_at_target(e, s, EVENT_DG_REFUSED, error);
            if (refusal(error))
                target_failed(e, l, s->target, error);
            session_end(e, s, END_ERROR);
            return;
        }
        touch(e, s);
        if ((size_t)n > size) {
            drop(e, l, DG_TRUNCATED, 1, EVENT_DG_TRUNCATED, (int)n, &s->peer.sa, s->peerlen);
            continue;
        }
        /* A unix client that bound no address (its length is the family's alone) cannot
         * be answered. */
        if (s->peerlen <= sizeof(sa_family_t) ||
            sendto(l->fd, buf, (size_t)n, MSG_DONTWAIT | MSG_NOSIGNAL, &s->peer.sa, s->peerlen) < 0) {
            int error = s->peerlen <= sizeof(sa_family_t) ? EDESTADDRREQ : errno;
            drop(e, l, DG_SEND_ERROR, 1, EVENT_DG_REPLY_ERROR, error, &s->peer.sa, s->peerlen);
            continue;
        }
        row_add(e, l, e->lay.dg_to_client, 1);
        row_add(e, l, e->lay.dg_bytes_to_client, n);
        if (++s->replies == l->replies_max) {
            session_end(e, s, END_REPLIES);
            return;
        }
    }
}

/* -- timeouts ------------------------------------------------------------------------------------- */

/* How long a session of `l` may stay quiet: --datagram-timeout, and while the worker
 * drains no longer than one sweep interval (its clients' next datagrams go to the workers
 * that read the listener now: it only waits for late replies), as datagram.py's linger. */
static int64_t quiet_limit(engine *e, const struct dlistener *l)
{
    int64_t limit = l->timeout_ns;
    if (e->draining && limit) {
        int64_t linger = timer_slack(limit);
        if (linger < limit)
            limit = linger;
    }
    return limit;
}

void datagram_expire(engine *e, int64_t now)
{
    for (int i = 0; i < e->ndlisteners; i++) {
        struct dlistener *l = &e->dlisteners[i];
        int64_t limit = quiet_limit(e, l);
        while (limit && !list_empty(&l->sessions)) {
            struct session *s = container_of(l->sessions.next, struct session, lru);
            if (now - s->active_ns < limit)
                break;
            session_end(e, s, END_TIMEOUT);
        }
    }
}

int64_t datagram_next_deadline(engine *e)
{
    int64_t next = 0;
    for (int i = 0; i < e->ndlisteners; i++) {
        struct dlistener *l = &e->dlisteners[i];
        int64_t limit = quiet_limit(e, l);
        if (!limit || list_empty(&l->sessions))
            continue;
        struct session *s = container_of(l->sessions.next, struct session, lru);
        int64_t due = s->active_ns + limit + timer_slack(limit);
        if (next == 0 || due < next)
            next = due;
    }
    return next;
}
