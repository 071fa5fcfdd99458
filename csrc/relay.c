/* One relayed connection: two spliced directions, half-close, abort, teardown.
 *
 * Per direction, bytes go source socket -> pipe -> destination socket with splice(2);
 * the source is read while its pipe has room and the pipe is flushed while the
 * destination takes bytes: at most a pipe's capacity is ever held (exact backpressure).
 * Edge-triggered readiness (loop.c) means a direction runs until a call says EAGAIN; a
 * direction that still has work after READS_PER_WAKEUP full reads goes to the run queue
 * so other connections get their turn.
 *
 * EOF from a source is passed on as shutdown(SHUT_WR) of the destination once the pipe
 * has drained, unless the other direction is done too: then both are just closed. Any
 * other end is an abort, as splice.py's: an error on either side (a reset, a failed
 * write), no pipe to be had, a failed shutdown, the idle or graceful timeout; both sockets
 * are closed with SO_LINGER 0, so each TCP peer gets an RST, not a FIN.
 *
 * Urgent data: splice(2) stops for good at a TCP urgent mark while the socket stays
 * readable. epoll reports the mark as EPOLLPRI; then, and only then, the socket gets
 * SO_OOBINLINE and the bytes at the mark are read with recv(2) into the pipe, the urgent
 * byte in its place in the stream, and splicing goes on after it.
 */
#include "engine.h"

#include <errno.h>
#include <fcntl.h>
#include <sys/epoll.h>
#include <unistd.h>

#define READS_PER_WAKEUP 4
#define URGENT_READ 4096
#define SPLICE_FLAGS (SPLICE_F_MOVE | SPLICE_F_NONBLOCK)

enum pump_result { PUMP_IDLE = 0, PUMP_MORE, PUMP_CLOSED };

bool peer_gone_errno(int error)
{
    switch (error) {
    case ECONNRESET:
    case EPIPE:
    case ETIMEDOUT:
    case ECONNABORTED:
    case EHOSTUNREACH:
    case ENETUNREACH:
    case ENOTCONN:
        return true;
    default:
        return false;
    }
}

static int pipe_acquire(engine *e, struct pipe_pool *pool, struct pipe_buf *p)
{
    if (pool->count > 0) {
        *p = pool->pipes[--pool->count];
        e->pipes_in_use++;
        return 0;
    }
    int fds[2];
    if (pipe2(fds, O_NONBLOCK | O_CLOEXEC) < 0)
        return -1;
    if (pool->size)
        fcntl(fds[0], F_SETPIPE_SZ, pool->size); /* over the user's pipe limit: smaller */
    int size = fcntl(fds[0], F_GETPIPE_SZ);
    p->rfd = fds[0];
    p->wfd = fds[1];
    p->capacity = size > 0 ? (uint32_t)size : 4096;
    e->pipes_in_use++;
    return 0;
}

static void pipe_close(struct pipe_buf *p)
{
    close(p->rfd);
    close(p->wfd);
    p->rfd = p->wfd = -1;
}

/* Only empty pipes are kept: no byte can leak into another connection. A pipe the kernel
 * made smaller than asked is not kept either: the next may get the full size. */
static void pipe_release(engine *e, struct pipe_pool *pool, struct direction *d)
{
    struct pipe_buf *p = &d->pipe;
    if (p->rfd < 0)
        return;
    e->pipes_in_use--;
    if (d->pending == 0 && pool->count < pool->keep && p->capacity >= (uint32_t)pool->size) {
        pool->pipes[pool->count++] = *p;
        p->rfd = p->wfd = -1;
    } else {
        pipe_close(p);
    }
    d->pending = 0;
}

void pipe_pools_close(engine *e)
{
    for (int i = 0; i < e->npools; i++) {
        struct pipe_pool *pool = &e->pools[i];
        while (pool->count > 0)
            pipe_close(&pool->pipes[--pool->count]);
    }
}

void relay_start(engine *e, conn *c)
{
    c->state = CONN_RELAYING;
    c->counted_relay = true;
    if (c->route->idle_timeout_ns) {
        c->active_ns = e->now_ns;
        list_add_tail(&c->route->idle, &c->timed);
    }
    relay_pump(e, c);
}

void relay_on_event(engine *e, conn *c, bool client_side, uint32_t events)
{
    struct sock_state *s = client_side ? &c->cs : &c->ts;
    if (events & (EPOLLIN | EPOLLPRI | EPOLLRDHUP | EPOLLHUP | EPOLLERR))
        s->readable = true;
    if (events & (EPOLLOUT | EPOLLHUP | EPOLLERR))
        s->writable = true;
    s->urgent = (events & EPOLLPRI) != 0; /* the mask is the state at the harvest */
    if (events & EPOLLRDHUP)
        s->hangup = true;
    if (c->state != CONN_RELAYING) {
        /* A client that resets while its target is being connected: give up now, passing
         * the abort on to a target that may have accepted already. */
        if (client_side && (events & EPOLLERR)) {
            c->end = END_REASON_CLIENT_RESET;
            conn_close(e, c, END_ABORT, ECONNRESET);
        }
        return;
    }
    if (c->route->idle_timeout_ns && (events & EPOLLIN)) {
        c->active_ns = e->now_ns;
        list_del(&c->timed);
        list_add_tail(&c->route->idle, &c->timed);
    }
    relay_pump(e, c);
}

/* The source is at an urgent mark (splice says EAGAIN on an empty pipe after EPOLLPRI):
 * read past it with the urgent byte inline. Returns bytes moved into the empty pipe,
 * 0 for nothing to read, or -errno. */
static ssize_t read_urgent_inline(struct sock_state *src, int src_fd, struct direction *d)
{
    if (!src->oobinline) {
        int one = 1;
        if (setsockopt(src_fd, SOL_SOCKET, SO_OOBINLINE, &one, sizeof one) < 0)
            return 0; /* not TCP: no urgent data */
        src->oobinline = true;
    }
    char buf[URGENT_READ];
    size_t room = d->pipe.capacity < sizeof buf ? d->pipe.capacity : sizeof buf;
    ssize_t n = recv(src_fd, buf, room, MSG_DONTWAIT);
    if (n < 0)
        return errno == EAGAIN || errno == EWOULDBLOCK ? 0 : -errno;
    if (n == 0)
        return 0;
    /* An empty pipe of at least a page takes up to a page whole (pipe(7), PIPE_BUF). */
    ssize_t w = write(d->pipe.wfd, buf, (size_t)n);
    return w == n ? n : -EIO;
}

enum copy_result { COPY_NOTHING, COPY_MOVED, COPY_EOF, COPY_SOURCE_FAILED, COPY_DESTINATION_FAILED };

/* A small read through the worker's buffer: recv + send costs less than two splices, and
 * a short recv means the socket is drained (one call fewer than splice's EAGAIN). Bytes the
 * destination does not take go into the direction's (empty) pipe and are flushed from
 * there like spliced ones. A read that fills the buffer makes the direction bulk: spliced
 * from then on. The sockets have SO_OOBINLINE, so a recv that starts at an urgent mark
 * reads the urgent byte in its place instead of skipping it. */
static enum copy_result copy_small(engine *e, struct direction *d, int src_fd,
                                   struct sock_state *src, int dst_fd, struct sock_state *dst)
{
    size_t size = (size_t)e->copy_size < d->pipe.capacity ? (size_t)e->copy_size : d->pipe.capacity;
    ssize_t n = recv(src_fd, e->copybuf, size, MSG_DONTWAIT);
    if (n < 0) {
        if (errno != EAGAIN && errno != EWOULDBLOCK)
            return COPY_SOURCE_FAILED;
        src->readable = false;
        return COPY_NOTHING;
    }
    if (n == 0) {
        d->eof = true;
        src->readable = false;
        return COPY_EOF;
    }
    if ((size_t)n == size)
        d->bulk = true;
    else if (!src->hangup)
        src->readable = false; /* drained; with the FIN in, read on to the EOF */
    ssize_t m = send(dst_fd, e->copybuf, (size_t)n, MSG_NOSIGNAL | MSG_DONTWAIT);
    if (m < 0) {
        if (errno != EAGAIN && errno != EWOULDBLOCK)
            return COPY_DESTINATION_FAILED;
        m = 0;
    }
    slot_add(e, d->counter, m);
    d->moved += (uint64_t)m;
    if (d->row_counter)
        slot_add(e, d->row_counter, m);
    if (m < n) {
        dst->writable = false;
        ssize_t w = write(d->pipe.wfd, e->copybuf + m, (size_t)(n - m));
        if (w != n - m) {
            errno = EIO;
            return COPY_DESTINATION_FAILED; /* an empty pipe takes what fits its capacity */
        }
        d->pending = (uint32_t)w;
    }
    return COPY_MOVED;
}

/* A failure of direction `d`'s source (`source`) or destination ends the connection:
 * which peer's side it was, for the access log's client-reset or target-reset. */
static void ended_by(conn *c, const struct direction *d, bool source)
{
    c->end_by_client = (d == &c->to_target) == source;
}

/* EOF read and every byte delivered: pass the EOF on. */
static enum pump_result finish(engine *e, conn *c, struct direction *d, int dst_fd)
{
    d->done = true;
    pipe_release(e, c->route->pool, d);
    struct direction *other = d == &c->to_target ? &c->to_client : &c->to_target;
    if (other->done) {
        /* Named by the peer that closed first (the direction that finished first). */
        c->end = c->end_by_client ? END_REASON_CLIENT_CLOSED : END_REASON_TARGET_CLOSED;
        conn_close(e, c, END_NORMAL, 0); /* a close sends the FIN: no shutdown */
        return PUMP_CLOSED;
    }
    c->end_by_client = d == &c->to_target;
    /* A peer gone already is seen by the other direction; any other error aborts. */
    if (shutdown(dst_fd, SHUT_WR) < 0 && !peer_gone_errno(errno)) {
        ended_by(c, d, false);
        conn_close(e, c, END_ABORT, errno);
        return PUMP_CLOSED;
    }
    return PUMP_IDLE;
}

static enum pump_result pump(engine *e, conn *c, struct direction *d, int src_fd,
                             struct sock_state *src, int dst_fd, struct sock_state *dst)
{
    struct pipe_pool *pool = c->route->pool;
    int reads = 0;
    if (d->done)
        return PUMP_IDLE;
    for (;;) {
        bool progress = false;
        if (d->pending && dst->writable) {
            ssize_t n = splice(d->pipe.rfd, NULL, dst_fd, NULL, d->pending, SPLICE_FLAGS);
            if (n < 0) {
                if (errno != EAGAIN) {
                    ended_by(c, d, false);
                    conn_close(e, c, END_ABORT, errno); /* the destination failed */
                    return PUMP_CLOSED;
                }
                dst->writable = false;
            } else {
                d->pending -= (uint32_t)n;
                slot_add(e, d->counter, n);
                d->moved += (uint64_t)n;
                if (d->row_counter)
                    slot_add(e, d->row_counter, n);
                progress = n > 0;
                if (!d->pending)
                    pipe_release(e, pool, d);
            }
        }
        if (!d->pending && d->eof)
            return finish(e, c, d, dst_fd);
        if (!d->eof && src->readable) {
            if (reads >= READS_PER_WAKEUP)
                return PUMP_MORE;
            if (d->pipe.rfd < 0 && pipe_acquire(e, pool, &d->pipe) < 0) {
                ended_by(c, d, true);
                conn_close(e, c, END_ABORT, errno);
                return PUMP_CLOSED;
            }
            uint32_t room = d->pipe.capacity - d->pending;
            if (e->copy_size && !d->bulk && !d->pending && dst->writable && !src->urgent &&
                src->oobinline) {
                enum copy_result r = copy_small(e, d, src_fd, src, dst_fd, dst);
                if (r == COPY_SOURCE_FAILED || r == COPY_DESTINATION_FAILED) {
                    ended_by(c, d, r == COPY_SOURCE_FAILED);
                    conn_close(e, c, END_ABORT, errno);
                    return PUMP_CLOSED;
                }
                if (r == COPY_MOVED)
                    reads++;
                if (!d->pending)
                    pipe_release(e, pool, d);
                if (r == COPY_NOTHING)
                    return PUMP_IDLE;
                continue;
            }
            if (room) {
                ssize_t n = splice(src_fd, NULL, d->pipe.wfd, NULL, room, SPLICE_FLAGS);
                if (n > 0) {
                    d->pending += (uint32_t)n;
                    reads++;
                    progress = true;
                } else if (n == 0) {
                    /* Nothing spliced and the FIN is in: the end, or an urgent mark
                     * before it (splice returns 0 there too). epoll's mask says which
                     * once the FIN's edge is in: wait for it if it is not. */
                    ssize_t u = src->hangup && src->urgent ? read_urgent_inline(src, src_fd, d) : 0;
                    if (u < 0) {
                        ended_by(c, d, true);
                        conn_close(e, c, END_ABORT, (int)-u);
                        return PUMP_CLOSED;
                    }
                    if (u > 0) {
                        d->pending += (uint32_t)u;
                        reads++;
                    } else if (src->hangup) {
                        d->eof = true;
                    }
                    if (u == 0)
                        src->readable = false;
                    progress = true;
                } else if (errno != EAGAIN) {
                    ended_by(c, d, true);
                    conn_close(e, c, END_ABORT, errno); /* the source failed */
                    return PUMP_CLOSED;
                } else if (!d->pending) {
                    /* Nothing to read, or an urgent mark that splice will not pass. */
                    ssize_t u = src->urgent ? read_urgent_inline(src, src_fd, d) : 0;
                    if (u < 0) {
                        ended_by(c, d, true);
                        conn_close(e, c, END_ABORT, (int)-u);
                        return PUMP_CLOSED;
                    }
                    if (u > 0) {
                        d->pending += (uint32_t)u;
                        reads++;
                        progress = true;
                    } else {
                        src->readable = false;
                        src->urgent = false;
                    }
                }
                /* EAGAIN with bytes pending: the pipe may be out of slots; read again
                 * once the destination took them. */
            }
            if (!d->pending)
                pipe_release(e, pool, d); /* idle connections hold no pipe */
        }
        if (!progress)
            return PUMP_IDLE;
    }
}

void relay_pump(engine *e, conn *c)
{
    e->stat_pumps++;
    enum pump_result a = pump(e, c, &c->to_target, c->client_fd, &c->cs, c->target_fd, &c->ts);
    if (a == PUMP_CLOSED)
        return;
    enum pump_result b = pump(e, c, &c->to_client, c->target_fd, &c->ts, c->client_fd, &c->cs);
    if (b == PUMP_CLOSED)
        return;
    if (a == PUMP_MORE || b == PUMP_MORE)
        runq_push(e, c);
}

static void set_abort(int fd)
{
    struct linger now = {.l_onoff = 1, .l_linger = 0};
    setsockopt(fd, SOL_SOCKET, SO_LINGER, &now, sizeof now);
}

/* End a connection in any state: close its fds (both with an RST for an abort), then give
 * back its admission, count it, and leave the struct to be freed after the batch. */
void conn_close(engine *e, conn *c, enum end_how how, int error)
{
    if (c->state == CONN_CLOSED)
        return;
    access_log_conn(e, c); /* while its sockets are open */
    bool relayed = c->counted_relay;
    connect_cancel(e, c);
    if (c->in_runq) {
        list_del(&c->queued);
        c->in_runq = false;
    }
    c->state = CONN_CLOSED;
    list_del(&c->all);
    list_del(&c->timed);
    if (how == END_ABORT) {
        set_abort(c->client_fd);
        if (c->target_fd >= 0)
            set_abort(c->target_fd);
    }
    close(c->client_fd);
    if (c->target_fd >= 0)
        close(c->target_fd);
    c->client_fd = c->target_fd = -1;
    pipe_release(e, c->route->pool, &c->to_target);
    pipe_release(e, c->route->pool, &c->to_client);
    admission_release(e, c->admission);
    c->admission = NO_TOKEN;
    slot_add(e, e->lay.active, -1);
    slot_add(e, e->lay.closed, 1);
    if (c->target_row) {
        slot_add(e, c->target_row + e->lay.target_active, -1);
        c->target_row = 0;
    }
    __atomic_store_n(slot_word(e, e->lay.last_activity_ns), e->now_ns, __ATOMIC_RELAXED);
    if (relayed) {
        observe(e, &e->connection_hist, e->now_ns - c->started_ns);
        if (error && !peer_gone_errno(error))
            event_report(e, EVENT_RELAY_ERROR, error, c->listener->index, &c->peer.sa,
                         c->peerlen, NULL);
    }
    e->open--;
    if (e->open == 0) {
        e->want_idle = true;
        if (e->draining)
            e->want_drained = true;
    }
    list_add_tail(&e->graveyard, &c->queued);
}

/* --idle-timeout: abort the route's relays quiet for longer (its LRU's head first). */
void idle_expire(engine *e, struct route *r, int64_t now)
{
    while (!list_empty(&r->idle)) {
        conn *c = container_of(r->idle.next, conn, timed);
        if (c->active_ns + r->idle_timeout_ns > now)
            break;
        c->end = END_REASON_IDLE_TIMEOUT;
        conn_close(e, c, END_ABORT, ETIMEDOUT);
    }
}
