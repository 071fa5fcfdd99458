/* Calls out to Python: hooks and the rate-limited events, and the enter/leave discipline
 * every public method follows.
 *
 * The engine calls out only at the end of an outermost call, never with a connection
 * half-handled: hooks.resolve for host-name targets, hooks.on_event for conditions (at most
 * once a second per kind, with a count), hooks.on_idle when the last connection closed,
 * hooks.on_drained once draining found nothing left, hooks.on_capacity_wait in queue mode.
 * A hook may call the engine back (but not dispatch or close). The first exception a hook
 * raises is raised from the call that ran it, after the engine has finished its work: a
 * failed resolve fails that target attempt, nothing leaks.
 */
#include "engine.h"

#include <errno.h>
#include <string.h>

#define EVENT_INTERVAL_NS 1000000000LL

void engine_keep_error(engine *e)
{
    if (e->error_type == NULL)
        PyErr_Fetch(&e->error_type, &e->error_value, &e->error_tb);
    else
        PyErr_WriteUnraisable((PyObject *)e);
}

void event_report(engine *e, enum event_code code, int error, int index,
                  const struct sockaddr *peer, socklen_t peerlen, PyObject *target)
{
    struct event_state *st = &e->events[code];
    st->count++;
    st->error = error;
    st->index = index;
    st->target = target;
    if (peerlen > sizeof st->peer)
        peerlen = 0;
    if (peer != NULL && peerlen)
        memcpy(&st->peer, peer, peerlen);
    st->peerlen = peer != NULL ? peerlen : 0;
    st->pair = peer != NULL && target != NULL;
    if (st->next_ns > e->now_ns && (e->events_due_ns == 0 || st->next_ns < e->events_due_ns))
        e->events_due_ns = st->next_ns;
}

void observe(engine *e, const struct histogram *h, int64_t ns)
{
    int i = 0;
    while (i < h->count && ns > h->bound_ns[i])
        i++;
    slot_add(e, h->buckets + 8 * (size_t)i, 1);
    slot_add(e, h->sum_ns, ns);
}

static void report_events(engine *e)
{
    int64_t due = 0;
    for (int code = 0; code < EVENT_KINDS; code++) {
        struct event_state *st = &e->events[code];
        if (!st->count)
            continue;
        if (st->next_ns > e->now_ns) {
            if (due == 0 || st->next_ns < due)
                due = st->next_ns;
            continue;
        }
        uint64_t count = st->count;
        st->count = 0;
        st->next_ns = e->now_ns + EVENT_INTERVAL_NS;
        PyObject *subject = st->pair ? Py_BuildValue(
                                           "(NO)", sockaddr_text((struct sockaddr *)&st->peer,
                                                                 st->peerlen), st->target)
                            : st->target ? Py_NewRef(st->target)
                            : st->peerlen ? sockaddr_text((struct sockaddr *)&st->peer, st->peerlen)
                                          : Py_NewRef(Py_None);
        if (subject == NULL) {
            engine_keep_error(e);
            continue;
        }
        PyObject *r = e->hook_event == NULL
                          ? Py_NewRef(Py_None)
                          : PyObject_CallFunction(e->hook_event, "iKi(iO)", code,
                                                  (unsigned long long)count, st->error,
                                                  st->index, subject);
        Py_DECREF(subject);
        if (r == NULL)
            engine_keep_error(e);
        Py_XDECREF(r);
    }
    e->events_due_ns = due;
}

static void ask_resolve(engine *e)
{
    for (;;) {
        conn *c = NULL;
        for (struct link *l = e->resolveq.next; l != &e->resolveq; l = l->next) {
            conn *candidate = container_of(l, conn, queued);
            if (!candidate->resolve_asked) {
                c = candidate;
                break;
            }
        }
        if (c == NULL)
            return;
        c->resolve_asked = true;
        struct target *t = &c->route->group->targets[c->target];
        uint64_t token = c->token;
        PyObject *r = PyObject_CallFunction(e->hook_resolve, "KOi", (unsigned long long)token,
                                            t->host, t->port);
        if (r == NULL) {
            engine_keep_error(e);
            /* The hook may have answered before raising: fail only a question still open. */
            for (struct link *l = e->resolveq.next; l != &e->resolveq; l = l->next)
                if (container_of(l, conn, queued)->token == token) {
                    connect_resolve_failed(e, container_of(l, conn, queued), EHOSTUNREACH);
                    break;
                }
        }
        Py_XDECREF(r);
    }
}

static bool call_hook0(engine *e, PyObject *hook)
{
    if (hook == NULL)
        return true;
    PyObject *r = PyObject_CallNoArgs(hook);
    if (r == NULL) {
        engine_keep_error(e);
        return false;
    }
    Py_DECREF(r);
    return true;
}

/* At the end of an outermost call: everything the engine owes Python, until nothing is
 * left (a hook may cause more work). */
static void flush(engine *e)
{
    for (int rounds = 0; rounds < 16; rounds++) {
        bool more = false;
        if (!list_empty(&e->resolveq)) {
            ask_resolve(e);
        }
        for (int code = 0; code < EVENT_KINDS; code++)
            if (e->events[code].count && e->events[code].next_ns <= e->now_ns) {
                report_events(e);
                break;
            }
        if (e->want_capacity && e->hook_capacity != NULL) {
            e->want_capacity = false;
            PyObject *r = PyObject_CallFunction(e->hook_capacity, "I", e->capacity_seq);
            if (r == NULL)
                engine_keep_error(e);
            Py_XDECREF(r);
            more = true;
        }
        if (e->want_idle) {
            e->want_idle = false;
            if (e->open == 0)
                call_hook0(e, e->hook_idle);
            more = true;
        }
        if (e->want_drained && !e->drained_reported && e->open == 0 && e->held_fd < 0 &&
            e->nsessions == 0) {
            e->drained_reported = true;
            call_hook0(e, e->hook_drained);
            more = true;
        }
        e->want_drained = false;
        if (!more)
            break;
    }
    engine_free_graveyard(e);
    timers_update(e);
}

/* Every public call that can do engine work: enter() first, leave() last. */
int engine_enter(engine *e)
{
    if (e->closed) {
        PyErr_SetString(PyExc_ValueError, "the engine is closed");
        return -1;
    }
    if (!e->dispatching)
        e->now_ns = monotonic_ns();
    return 0;
}

PyObject *engine_leave(engine *e, PyObject *result)
{
    if (e->dispatching)
        return result; /* called from a hook: the outer call flushes */
    e->dispatching = true;
    flush(e);
    e->dispatching = false;
    if (e->error_type != NULL) {
        Py_XDECREF(result);
        PyErr_Restore(e->error_type, e->error_value, e->error_tb);
        e->error_type = e->error_value = e->error_tb = NULL;
        return NULL;
    }
    return result;
}
