/* Accepting clients: accept4 in a bounded batch, admission, refusal, pausing.
 *
 * A client refused at the cap is accepted and closed at once (REFUSED counted before the
 * close, so a kill between them cannot hide it); in queue mode (--on-limit=queue) it is
 * held instead and accepting stops until hooks.on_capacity's waiter says capacity may
 * be back (engine.retry_held()). A client that meets the admission mutex busy is held the
 * same way, in either mode, and tried again every BUSY_RETRY_NS (never refused for it:
 * that would close it with its request unread). Running out of descriptors pauses accepting for
 * ACCEPT_PAUSE and leaves clients in the backlog. Never closes a listener.
 */
#include "engine.h"

#include <errno.h>
#include <netinet/tcp.h>
#include <string.h>
#include <sys/epoll.h>
#include <unistd.h>

#define ACCEPT_BATCH 32
#define ACCEPT_PAUSE_NS 500000000
#define BUSY_RETRY_NS 10000000 /* accepting.py's BUSY_RETRY_INTERVAL */

int listeners_register(engine *e)
{
    for (int i = 0; i < e->nlisteners; i++) {
        struct listener *l = &e->listeners[i];
        if (l->registered)
            continue;
        if (epoll_add(e, l->fd, EPOLLIN | EPOLLEXCLUSIVE, &l->watch) < 0) {
            if (errno != EINVAL || epoll_add(e, l->fd, EPOLLIN, &l->watch) < 0)
                return -1; /* EINVAL: a kernel without EPOLLEXCLUSIVE */
        }
        l->registered = true;
    }
    return 0;
}

/* Before the caller closes its copy of a listener: epoll watches the open file, which
 * other processes keep open, so it must be removed explicitly. */
void listeners_unregister(engine *e)
{
    for (int i = 0; i < e->nlisteners; i++) {
        struct listener *l = &e->listeners[i];
        if (l->registered) {
            epoll_ctl(e->epfd, EPOLL_CTL_DEL, l->fd, NULL);
            l->registered = false;
        }
    }
}

/* The TCP options a client needs set: those its listener does not already pass on
 * (Linux copies TCP_NODELAY, SO_KEEPALIVE and the keep-alive timings to accepted
 * sockets), so a unit that sets them on the socket saves a setsockopt per client. */
int setup_listener_options(engine *e, struct listener *l)
{
    l->nclient_options = 0;
    if (l->family != AF_INET && l->family != AF_INET6)
        return 0;
    int inline_ = 0;
    socklen_t inline_len = sizeof inline_;
    l->oobinline = getsockopt(l->fd, SOL_SOCKET, SO_OOBINLINE, &inline_, &inline_len) == 0 && inline_;
    const struct route *r = &e->routes[l->route];
    for (int i = 0; i < r->noptions; i++) {
        int value = 0;
        socklen_t len = sizeof value;
        const int *opt = r->options[i];
        if (getsockopt(l->fd, opt[0], opt[1], &value, &len) == 0 && value == opt[2])
            continue;
        memcpy(l->client_options[l->nclient_options++], opt, sizeof l->client_options[0]);
    }
    return 0;
}

static void pause_accepting(engine *e)
{
    if (e->accepting) {
        listeners_unregister(e);
        e->accepting = false;
        e->accept_resume_ns = e->now_ns + ACCEPT_PAUSE_NS;
    }
}

void accept_resume(engine *e)
{
    connect_retry_waiting(e);
    if (e->draining || e->accepting || e->held_fd >= 0)
        return;
    /* Still short of descriptors? The kernel hands out the lowest free one. */
    int probe = dup(e->epfd);
    if (probe >= 0)
        close(probe);
    if (probe < 0 || probe >= e->fd_ceiling) {
        e->accept_resume_ns = e->now_ns + ACCEPT_PAUSE_NS;
        return;
    }
    if (listeners_register(e) == 0)
        e->accepting = true;
}

static void admitted(engine *e, struct listener *l, int fd, const struct sockaddr *peer,
                     socklen_t peerlen, int token)
{
    conn *c = PyMem_Calloc(1, sizeof *c);
    if (c == NULL) {
        slot_add(e, e->lay.refused, 1);
        close(fd);
        admission_release(e, token);
        return;
    }
    c->wclient.kind = WATCH_CLIENT;
    c->wtarget.kind = WATCH_TARGET;
    c->client_fd = fd;
    c->target_fd = -1;
    c->target = -1;
    c->listener = l;
    c->route = &e->routes[l->route];
    c->admission = token;
    c->end = -1;
    c->started_ns = e->now_ns;
    c->to_target.pipe.rfd = c->to_target.pipe.wfd = -1;
    c->to_client.pipe.rfd = c->to_client.pipe.wfd = -1;
    c->to_target.counter = e->lay.bytes_to_target;
    c->to_client.counter = e->lay.bytes_to_client;
    if (peerlen > sizeof c->peer)
        peerlen = sizeof c->peer;
    memcpy(&c->peer, peer, peerlen);
    c->peerlen = peerlen;
    list_add_tail(&e->conns, &c->all);
    e->open++;
    slot_add(e, e->lay.accepted, 1);
    slot_add(e, e->lay.active, 1);
    size_t row = listener_row(e, l);
    if (row)
        slot_add(e, row + e->lay.listener_connections, 1);
    for (int i = 0; i < l->nclient_options; i++) {
        const int *opt = l->client_options[i];
        setsockopt(fd, opt[0], opt[1], &opt[2], sizeof opt[2]); /* a gone client: found later */
    }
    c->cs.oobinline = l->oobinline;
    if (e->copy_size && !l->oobinline && (l->family == AF_INET || l->family == AF_INET6)) {
        int one = 1; /* recv must never skip an urgent byte (relay.c, copy_small) */
        c->cs.oobinline = setsockopt(fd, SOL_SOCKET, SO_OOBINLINE, &one, sizeof one) == 0;
    }
    /* Watched from the start: data it sends meanwhile is seen, a reset ends the attempt. */
    if (epoll_add(e, fd, EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLPRI | EPOLLET, &c->wclient) < 0) {
        c->state = CONN_CONNECTING;
        conn_close(e, c, END_ABORT, errno);
        return;
    }
    connect_start(e, c);
}

static void refuse(engine *e, struct listener *l, int fd, const struct sockaddr *peer,
                   socklen_t peerlen, enum admit_result why)
{
    slot_add(e, e->lay.refused, 1); /* before the close: a kill between must not hide it */
    count_refusal(e, l, why == REFUSED_CAP ? L_CAP : why == REFUSED_SOURCE ? L_PER_SOURCE : L_BUSY);
    access_log_refused(e, l, peer, peerlen,
                       why == REFUSED_SOURCE ? END_REASON_REFUSED_PER_SOURCE : END_REASON_REFUSED_CAP);
    close(fd);
    enum event_code code = why == REFUSED_CAP      ? EVENT_REFUSED_CAP
                           : why == REFUSED_SOURCE ? EVENT_REFUSED_SOURCE
                                                   : EVENT_REFUSED_BUSY;
    event_report(e, code, 0, l->index, peer, peerlen, NULL);
}

/* Take the client off accepting's hands: accepting stops until it is admitted or refused
 * (the next clients wait in the backlog or go to other workers). */
static void hold_client(engine *e, struct listener *l, int fd, const struct sockaddr *peer,
                        socklen_t peerlen)
{
    e->held_fd = fd;
    e->held_listener = l;
    if (peerlen > sizeof e->held_peer)
        peerlen = 0;
    memcpy(&e->held_peer, peer, peerlen);
    e->held_peerlen = peerlen;
    listeners_unregister(e);
    e->accepting = false;
}

/* Queue mode, at the cap: wait for capacity as a waiter. */
static void start_waiting(engine *e)
{
    e->held_waiting = true;
    admission_wait_begin(e);
    admit_held(e); /* once more, now counted as a waiter: no release is missed */
}

/* Try the held client again: capacity came back (also what engine.retry_held() does), or
 * the busy mutex's retry is due. A busy mutex is no cap: that client is held and tried
 * again every BUSY_RETRY_NS, in either mode, never refused for it (accepting.py). */
void admit_held(engine *e)
{
    if (e->held_fd < 0)
        return;
    e->busy_retry_ns = 0;
    /* Read before the attempt: a release after it changes the word, so a waiter given this
     * value cannot miss it (futex(2)). */
    if (e->held_waiting)
        e->capacity_seq =
            __atomic_load_n((uint32_t *)(e->base + e->lay.capacity_seq), __ATOMIC_SEQ_CST);
    struct listener *l = e->held_listener;
    int token;
    enum admit_result r = admission_admit(e, &e->held_peer.sa, e->held_peerlen, l->source_limit,
                                          &token);
    if (e->held_waiting && (r == REFUSED_CAP || r == REFUSED_BUSY)) {
        e->want_capacity = true; /* hooks.c asks hooks.on_capacity_wait(seq) */
        return;
    }
    if (r == REFUSED_BUSY) {
        e->busy_retry_ns = e->now_ns + BUSY_RETRY_NS;
        return;
    }
    if (r == REFUSED_CAP && e->queue_on_limit && !e->held_waiting) {
        start_waiting(e); /* held for the mutex, now at the cap */
        return;
    }
    int fd = e->held_fd;
    e->held_fd = -1;
    e->want_capacity = false;
    if (e->held_waiting) {
        e->held_waiting = false;
        admission_wait_end(e);
    }
    if (r == ADMITTED)
        admitted(e, l, fd, &e->held_peer.sa, e->held_peerlen, token);
    else
        refuse(e, l, fd, &e->held_peer.sa, e->held_peerlen, r);
    if (e->draining)
        e->want_drained = true; /* reported once nothing is open */
    else if (!e->accepting && !e->accept_resume_ns && listeners_register(e) == 0)
        e->accepting = true;
}

void on_listener_ready(engine *e, struct listener *l)
{
    for (int i = 0; i < ACCEPT_BATCH && e->accepting; i++) {
        union {
            struct sockaddr sa;
            struct sockaddr_storage ss;
        } peer;
        socklen_t peerlen = sizeof peer;
        int fd = accept4(l->fd, &peer.sa, &peerlen, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0) {
            int error = errno;
            if (error == EAGAIN || error == EWOULDBLOCK)
                return;
            if (error == EINTR || error == ECONNABORTED || error == EPROTO || error == EPERM)
                continue;
            event_report(e, EVENT_ACCEPT_ERROR, error, l->index, NULL, 0, NULL);
            if (error == EMFILE || error == ENFILE || error == ENOBUFS || error == ENOMEM)
                pause_accepting(e); /* the client waits in the backlog */
            return;
        }
        if (fd >= e->fd_ceiling) {
            /* All lower descriptors are taken: serve this client from the headroom,
             * leave the next ones in the backlog. */
            event_report(e, EVENT_FD_LOW, EMFILE, l->index, NULL, 0, NULL);
            pause_accepting(e);
        }
        if (peerlen > sizeof peer)
            peerlen = sizeof peer;
        int token;
        enum admit_result r = admission_admit(e, &peer.sa, peerlen, l->source_limit, &token);
        if (r == ADMITTED)
            admitted(e, l, fd, &peer.sa, peerlen, token);
        else if (r == REFUSED_CAP && e->queue_on_limit && e->held_fd < 0) {
            hold_client(e, l, fd, &peer.sa, peerlen);
            start_waiting(e);
        } else if (r == REFUSED_BUSY && e->held_fd < 0) {
            hold_client(e, l, fd, &peer.sa, peerlen);
            e->busy_retry_ns = e->now_ns + BUSY_RETRY_NS;
        } else
            refuse(e, l, fd, &peer.sa, peerlen, r);
    }
}
