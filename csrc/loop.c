/* The engine's epoll, its one timerfd, and the queues a dispatch works through.
 *
 * Connection sockets are registered once, edge-triggered, for everything they can
 * report (in, out, peer shutdown, urgent data): no epoll_ctl per change of interest.
 * What an edge said is kept in the connection's sock_state until a call says EAGAIN.
 * Listeners are level-triggered and exclusive (one worker woken per client).
 *
 * Timers are coarse: each route's connect and idle lists are kept in deadline order (a
 * FIFO with the route's fixed timeout, an LRU for idle), the timerfd is armed at the
 * earliest deadline plus a slack of timeout/8 and re-armed only when that is earlier than
 * what is armed, so a churned connection costs no timerfd_settime. Connections closed during a batch are
 * freed after it, so a later event of the same batch never finds freed memory.
 */
#include "engine.h"

#include <errno.h>
#include <sys/epoll.h>
#include <sys/timerfd.h>
#include <time.h>
#include <unistd.h>

#define MAX_EVENTS 256
#define RUNQ_ROUNDS 4 /* passes over the run queue per dispatch before yielding the loop */

int64_t monotonic_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

int epoll_add(engine *e, int fd, uint32_t events, struct watch *watch)
{
    struct epoll_event ev = {.events = events, .data.ptr = watch};
    return epoll_ctl(e->epfd, EPOLL_CTL_ADD, fd, &ev);
}

int loop_init(engine *e)
{
    e->epfd = epoll_create1(EPOLL_CLOEXEC);
    if (e->epfd < 0)
        return -1;
    e->timerfd = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC);
    if (e->timerfd < 0)
        return -1;
    e->timer_watch.kind = WATCH_TIMER;
    return epoll_add(e, e->timerfd, EPOLLIN, &e->timer_watch);
}

int64_t timer_slack(int64_t timeout_ns)
{
    int64_t s = timeout_ns / 8;
    if (s < 10000000)
        s = 10000000; /* 10 ms */
    if (s > 60000000000)
        s = 60000000000;
    return s;
}

/* The earliest moment something timed must run, 0 if nothing is. */
static int64_t next_deadline(engine *e)
{
    int64_t next = 0;
#define CONSIDER(t)                          \
    do {                                     \
        int64_t t_ = (t);                    \
        if (t_ > 0 && (next == 0 || t_ < next)) \
            next = t_;                       \
    } while (0)
    for (int i = 0; i < e->nroutes; i++) {
        struct route *r = &e->routes[i];
        if (!list_empty(&r->connecting)) {
            conn *c = container_of(r->connecting.next, conn, timed);
            CONSIDER(c->deadline_ns + timer_slack(r->connect_timeout_ns));
        }
        if (!list_empty(&r->idle)) {
            conn *c = container_of(r->idle.next, conn, timed);
            CONSIDER(c->active_ns + r->idle_timeout_ns + timer_slack(r->idle_timeout_ns));
        }
    }
    CONSIDER(datagram_next_deadline(e));
    CONSIDER(e->accept_resume_ns);
    CONSIDER(e->busy_retry_ns);
    CONSIDER(e->events_due_ns);
    if (e->wake_now)
        CONSIDER(1);
#undef CONSIDER
    return next;
}

/* Arm the timerfd if something is due before what is armed (never disarms: a timer that
 * fires early finds nothing due and re-arms for the next deadline). */
void timers_update(engine *e)
{
    int64_t next = next_deadline(e);
    if (next == 0 || (e->armed_ns && e->armed_ns <= next))
        return;
    struct itimerspec spec = {0};
    spec.it_value.tv_sec = next / 1000000000;
    spec.it_value.tv_nsec = next % 1000000000;
    if (timerfd_settime(e->timerfd, TFD_TIMER_ABSTIME, &spec, NULL) == 0)
        e->armed_ns = next;
}

static void on_timer(engine *e)
{
    uint64_t expirations;
    if (read(e->timerfd, &expirations, sizeof expirations) < 0 && errno == EAGAIN)
        return; /* a stale edge: armed again since */
    e->stat_timer_fires++;
    e->armed_ns = 0;
    e->wake_now = 0;
    int64_t now = e->now_ns;
    for (int i = 0; i < e->nroutes; i++) {
        connect_expire(e, &e->routes[i], now);
        idle_expire(e, &e->routes[i], now);
    }
    datagram_expire(e, now);
    if (e->accept_resume_ns && now >= e->accept_resume_ns) {
        e->accept_resume_ns = 0;
        accept_resume(e);
    }
    if (e->busy_retry_ns && now >= e->busy_retry_ns)
        admit_held(e); /* re-arms busy_retry_ns while the mutex stays busy */
    if (e->events_due_ns && now >= e->events_due_ns)
        e->events_due_ns = 0; /* module.c reports what is due after the batch */
}

void runq_push(engine *e, conn *c)
{
    if (!c->in_runq && c->state == CONN_RELAYING) {
        c->in_runq = true;
        list_add_tail(&e->runq, &c->queued);
    }
}

static void run_queue(engine *e)
{
    for (int round = 0; round < RUNQ_ROUNDS && !list_empty(&e->runq); round++) {
        struct link batch;
        list_init(&batch);
        /* Take the whole queue: what is pushed while it runs waits for the next round. */
        batch.next = e->runq.next;
        batch.prev = e->runq.prev;
        batch.next->prev = &batch;
        batch.prev->next = &batch;
        list_init(&e->runq);
        while (!list_empty(&batch)) {
            conn *c = container_of(batch.next, conn, queued);
            list_del(&c->queued);
            c->in_runq = false;
            relay_pump(e, c);
        }
    }
    if (!list_empty(&e->runq))
        e->wake_now = 1; /* more to move: come back through the loop, others first */
}

void engine_free_graveyard(engine *e)
{
    while (!list_empty(&e->dead_sessions)) {
        struct session *s = container_of(e->dead_sessions.next, struct session, lru);
        list_del(&s->lru);
        PyMem_Free(s);
    }
    while (!list_empty(&e->graveyard)) {
        conn *c = container_of(e->graveyard.next, conn, queued);
        list_del(&c->queued);
        PyMem_Free(c->order);
        PyMem_Free(c->addrs);
        PyMem_Free(c);
    }
}

/* One batch of ready events, then what they queued. Returns the number of events. */
static int one_batch(engine *e)
{
    struct epoll_event events[MAX_EVENTS];
    int n = epoll_wait(e->epfd, events, MAX_EVENTS, 0);
    if (n < 0)
        n = 0; /* EINTR: the caller's loop comes back */
    e->stat_events += (uint64_t)n;
    e->now_ns = monotonic_ns();
    e->connects_begun = false;
    for (int i = 0; i < n; i++) {
        struct watch *w = events[i].data.ptr;
        uint32_t ev = events[i].events;
        switch (w->kind) {
        case WATCH_LISTENER:
            on_listener_ready(e, (struct listener *)w);
            break;
        case WATCH_TIMER:
            on_timer(e);
            break;
        case WATCH_DATAGRAM:
            datagram_on_listener(e, (struct dlistener *)w);
            break;
        case WATCH_SESSION:
            datagram_on_session(e, (struct session *)w, ev);
            break;
        case WATCH_CLIENT: {
            conn *c = container_of(w, conn, wclient);
            if (c->state == CONN_RELAYING)
                relay_on_event(e, c, true, ev);
            else if (c->state != CONN_CLOSED)
                relay_on_event(e, c, true, ev); /* records readiness; may end a pending client */
            break;
        }
        case WATCH_TARGET: {
            conn *c = container_of(w, conn, wtarget);
            if (c->state == CONN_CONNECTING)
                connect_on_target_event(e, c, ev);
            else if (c->state == CONN_RELAYING)
                relay_on_event(e, c, false, ev);
            break;
        }
        }
    }
    return n;
}

/* A batch of ready events, then what they queued. A batch that began connects looks once
 * more at once: a connect to a local target has finished inside connect(2) (which still
 * says EINPROGRESS), so its first writable edge is already there, and the request the
 * client sent with it is relayed without a trip through the caller's loop. */
int loop_dispatch(engine *e)
{
    e->stat_dispatches++;
    int n = one_batch(e);
    if (e->connects_begun)
        n += one_batch(e);
    run_queue(e);
    engine_free_graveyard(e);
    timers_update(e);
    return n;
}
