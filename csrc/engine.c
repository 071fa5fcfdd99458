/* The Engine type: construction, the methods Python calls, teardown.
 *
 * One Engine per worker process, used from one thread; see README.md for the API.
 */
#include "engine.h"

#include <errno.h>
#include <unistd.h>

static PyObject *hook_attr(PyObject *hooks, const char *name, bool required)
{
    PyObject *v = PyObject_GetAttrString(hooks, name);
    if (v == NULL && !required && PyErr_ExceptionMatches(PyExc_AttributeError)) {
        PyErr_Clear();
        return NULL;
    }
    if (v == Py_None) {
        Py_DECREF(v);
        return NULL;
    }
    return v;
}

static void engine_release(engine *e)
{
    if (e->closed)
        return;
    e->closed = true;
    while (!list_empty(&e->conns)) {
        conn *c = container_of(e->conns.next, conn, all);
        c->end = END_REASON_STOPPED;
        conn_close(e, c, END_NORMAL, 0);
    }
    if (e->held_fd >= 0) {
        close(e->held_fd);
        e->held_fd = -1;
        if (e->held_waiting && e->base != NULL && e->lay.waiters)
            admission_wait_end(e);
        e->held_waiting = false;
    }
    datagram_free(e);
    engine_free_graveyard(e);
    pipe_pools_close(e);
    if (e->timerfd >= 0)
        close(e->timerfd);
    if (e->epfd >= 0)
        close(e->epfd);
    e->timerfd = e->epfd = -1;
    e->base = NULL;
    if (e->have_memory) {
        PyBuffer_Release(&e->memory);
        e->have_memory = false;
    }
}

static void engine_dealloc(engine *e)
{
    engine_release(e);
    for (int i = 0; i < e->ngroups; i++) {
        for (int j = 0; j < e->groups[i].count; j++) {
            Py_XDECREF(e->groups[i].targets[j].object);
            Py_XDECREF(e->groups[i].targets[j].host);
            PyMem_Free(e->groups[i].targets[j].text);
        }
        PyMem_Free(e->groups[i].targets);
    }
    PyMem_Free(e->groups);
    PyMem_Free(e->routes);
    PyMem_Free(e->pools);
    for (int i = 0; i < e->nlisteners; i++)
        PyMem_Free(e->listeners[i].log_name);
    PyMem_Free(e->listeners);
    PyMem_Free(e->logbuf);
    for (int i = 0; i < e->ndlisteners; i++)
        PyMem_Free(e->dlisteners[i].held_data);
    PyMem_Free(e->dlisteners);
    PyMem_Free(e->dgbuf);
    PyMem_Free(e->copybuf);
    Py_XDECREF(e->hook_resolve);
    Py_XDECREF(e->hook_event);
    Py_XDECREF(e->hook_idle);
    Py_XDECREF(e->hook_drained);
    Py_XDECREF(e->hook_capacity);
    Py_XDECREF(e->error_type);
    Py_XDECREF(e->error_value);
    Py_XDECREF(e->error_tb);
    Py_TYPE(e)->tp_free((PyObject *)e);
}

static PyObject *engine_new(PyTypeObject *type, PyObject *args, PyObject *kwargs)
{
    static char *names[] = {"memory", "layout", "slot", "listeners", "routes", "hooks",
                            "connect_timeout", "idle_timeout", "proxy_protocol", "tcp_options",
                            "pipe_size", "pipe_keep", "fd_ceiling", "queue_on_limit", "copy_size",
                            "datagram_listeners", "datagram_buffer", NULL};
    PyObject *memory, *layout, *listeners, *routes, *hooks, *datagram_listeners = NULL;
    Py_ssize_t datagram_buffer = 65536;
    Py_ssize_t slot;
    struct route_defaults defaults = {.pipe_keep = 4};
    int fd_ceiling = -1, queue = 0;
    int copy_size = COPY_SIZE_DEFAULT;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOnOOO|$ddiOiiipiOn", names, &memory, &layout,
                                     &slot, &listeners, &routes, &hooks, &defaults.connect_timeout,
                                     &defaults.idle_timeout, &defaults.proxy_protocol,
                                     &defaults.tcp_options, &defaults.pipe_size,
                                     &defaults.pipe_keep, &fd_ceiling, &queue, &copy_size,
                                     &datagram_listeners, &datagram_buffer))
        return NULL;
    if (slot < 0 || copy_size < 0 || copy_size > COPY_SIZE_MAX) {
        PyErr_SetString(PyExc_ValueError, "invalid slot or copy_size");
        return NULL;
    }
    engine *e = (engine *)type->tp_alloc(type, 0);
    if (e == NULL)
        return NULL;
    e->epfd = e->timerfd = e->held_fd = -1;
    list_init(&e->conns);
    list_init(&e->runq);
    list_init(&e->resolveq);
    list_init(&e->retryq);
    list_init(&e->graveyard);
    list_init(&e->dead_sessions);
    e->slot_index = (size_t)slot;
    e->fd_ceiling = fd_ceiling < 0 ? INT32_MAX : fd_ceiling;
    e->queue_on_limit = queue != 0;
    e->copy_size = copy_size;
    if (copy_size && (e->copybuf = PyMem_Malloc((size_t)copy_size)) == NULL) {
        PyErr_NoMemory();
        goto fail;
    }
    if (PyObject_GetBuffer(memory, &e->memory, PyBUF_WRITABLE) < 0)
        goto fail;
    e->have_memory = true;
    if (parse_layout(e, layout) < 0 || parse_routes(e, routes, &defaults) < 0 ||
        parse_listeners(e, listeners) < 0 ||
        parse_datagram_listeners(e, datagram_listeners, datagram_buffer) < 0 ||
        access_log_setup(e) < 0)
        goto fail;
    e->hook_resolve = hook_attr(hooks, "resolve", false);
    e->hook_event = hook_attr(hooks, "on_event", false);
    e->hook_idle = hook_attr(hooks, "on_idle", false);
    e->hook_drained = hook_attr(hooks, "on_drained", false);
    e->hook_capacity = hook_attr(hooks, "on_capacity_wait", false);
    if (PyErr_Occurred())
        goto fail;
    for (int i = 0; i < e->ngroups; i++)
        for (int j = 0; j < e->groups[i].count; j++)
            if (e->groups[i].targets[j].family == 0 && e->hook_resolve == NULL) {
                PyErr_SetString(PyExc_ValueError, "host-name targets need hooks.resolve");
                goto fail;
            }
    if (e->queue_on_limit && (e->hook_capacity == NULL || !e->lay.waiters)) {
        PyErr_SetString(PyExc_ValueError,
                        "queue_on_limit needs hooks.on_capacity_wait and the layout's waiters");
        goto fail;
    }
    if (loop_init(e) < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        goto fail;
    }
    return (PyObject *)e;
fail:
    Py_DECREF(e);
    return NULL;
}

static PyObject *engine_fileno(engine *e, PyObject *unused)
{
    (void)unused;
    if (e->closed) {
        PyErr_SetString(PyExc_ValueError, "the engine is closed");
        return NULL;
    }
    return PyLong_FromLong(e->epfd);
}

static PyObject *engine_dispatch(engine *e, PyObject *unused)
{
    (void)unused;
    if (engine_enter(e) < 0)
        return NULL;
    if (e->dispatching) {
        PyErr_SetString(PyExc_RuntimeError, "dispatch() called from a hook");
        return NULL;
    }
    e->dispatching = true;
    loop_dispatch(e);
    e->dispatching = false;
    return engine_leave(e, Py_NewRef(Py_None));
}

static PyObject *engine_start_accepting(engine *e, PyObject *unused)
{
    (void)unused;
    if (engine_enter(e) < 0)
        return NULL;
    if (e->draining) {
        PyErr_SetString(PyExc_RuntimeError, "the engine is draining");
        return NULL;
    }
    if (datagram_register(e) < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        return NULL;
    }
    if (!e->accepting && e->held_fd < 0) {
        e->accept_resume_ns = 0;
        if (listeners_register(e) < 0) {
            PyErr_SetFromErrno(PyExc_OSError);
            listeners_unregister(e);
            return NULL;
        }
        e->accepting = true;
    }
    return engine_leave(e, Py_NewRef(Py_None));
}

static PyObject *engine_stop_accepting(engine *e, PyObject *args, PyObject *kwargs)
{
    static char *names[] = {"drain", NULL};
    int drain = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "|$p", names, &drain) || engine_enter(e) < 0)
        return NULL;
    listeners_unregister(e);
    datagram_unregister(e);
    e->accepting = false;
    e->accept_resume_ns = 0;
    if (drain && !e->draining) {
        e->draining = true;
        e->want_drained = true;
        e->now_ns = monotonic_ns();
        timers_update(e); /* quiet datagram sessions now end sooner */
    }
    return engine_leave(e, Py_NewRef(Py_None));
}

static PyObject *engine_open_connections(engine *e, PyObject *unused)
{
    (void)unused;
    return PyLong_FromLong(e->open);
}

static PyObject *engine_open_sessions(engine *e, PyObject *unused)
{
    (void)unused;
    return PyLong_FromLong(e->nsessions);
}

static PyObject *engine_set_fd_ceiling(engine *e, PyObject *arg)
{
    long n = PyLong_AsLong(arg);
    if (n == -1 && PyErr_Occurred())
        return NULL;
    e->fd_ceiling = n < 0 || n > INT32_MAX ? INT32_MAX : (int)n;
    Py_RETURN_NONE;
}

static PyObject *engine_holding(engine *e, PyObject *unused)
{
    (void)unused;
    return PyBool_FromLong(e->held_fd >= 0);
}

/* The graceful timeout: a client held in queue mode is refused, one still connecting is
 * closed, a relay is aborted (an RST to both peers), as relaying.py's abort_all. */
static PyObject *engine_close_all(engine *e, PyObject *unused)
{
    (void)unused;
    if (engine_enter(e) < 0)
        return NULL;
    if (e->held_fd >= 0) {
        slot_add(e, e->lay.refused, 1);
        count_refusal(e, e->held_listener, e->held_waiting ? L_CAP : L_BUSY);
        access_log_refused(e, e->held_listener, &e->held_peer.sa, e->held_peerlen,
                           END_REASON_STOPPED);
        close(e->held_fd);
        e->held_fd = -1;
        e->want_capacity = false;
        e->busy_retry_ns = 0;
        if (e->held_waiting)
            admission_wait_end(e);
        e->held_waiting = false;
        e->want_drained = e->draining;
    }
    while (!list_empty(&e->conns)) {
        conn *c = container_of(e->conns.next, conn, all);
        c->end = END_REASON_STOPPED;
        conn_close(e, c, c->state == CONN_RELAYING ? END_ABORT : END_NORMAL, ETIMEDOUT);
    }
    datagram_end_all(e);
    return engine_leave(e, Py_NewRef(Py_None));
}

static conn *find_resolving(engine *e, unsigned long long token)
{
    for (struct link *l = e->resolveq.next; l != &e->resolveq; l = l->next) {
        conn *c = container_of(l, conn, queued);
        if (c->token == token && c->state == CONN_RESOLVING)
            return c;
    }
    return NULL;
}

static PyObject *engine_resolved(engine *e, PyObject *args)
{
    unsigned long long token;
    PyObject *addrs;
    if (!PyArg_ParseTuple(args, "KO", &token, &addrs) || engine_enter(e) < 0)
        return NULL;
    conn *c = find_resolving(e, token);
    if (c == NULL)
        return engine_leave(e, Py_NewRef(Py_False)); /* timed out or closed meanwhile */
    PyObject *seq = PySequence_Fast(addrs, "addresses must be a sequence");
    Py_ssize_t n = seq == NULL ? 0 : PySequence_Fast_GET_SIZE(seq);
    struct sockaddr_storage *list = seq == NULL ? NULL : PyMem_Calloc((size_t)n + 1, sizeof *list);
    if (seq != NULL && list == NULL)
        PyErr_NoMemory();
    int count = 0;
    for (Py_ssize_t i = 0; list != NULL && i < n && count < 64; i++) {
        PyObject *item = PySequence_Fast_GET_ITEM(seq, i);
        /* (family, sockaddr) or getaddrinfo's (family, type, proto, canonname, sockaddr) */
        Py_ssize_t len = PyTuple_Check(item) ? PyTuple_GET_SIZE(item) : 0;
        if (len != 2 && len != 5) {
            PyErr_SetString(PyExc_TypeError, "an address is (family, sockaddr)");
            break;
        }
        long family = PyLong_AsLong(PyTuple_GET_ITEM(item, 0));
        if (family == -1 && PyErr_Occurred())
            break;
        socklen_t slen;
        if (family != AF_INET && family != AF_INET6)
            continue;
        if (to_sockaddr((int)family, PyTuple_GET_ITEM(item, len - 1), &list[count], &slen) < 0)
            break;
        count++;
    }
    Py_XDECREF(seq);
    if (PyErr_Occurred()) {
        /* An answer it cannot use fails the attempt, as any error connecting does; the
         * exception is raised once the engine's work is done. */
        PyMem_Free(list);
        engine_keep_error(e);
        connect_resolve_failed(e, c, EINVAL);
        return engine_leave(e, Py_NewRef(Py_True));
    }
    connect_resolved(e, c, list, count);
    return engine_leave(e, Py_NewRef(Py_True));
}

static PyObject *engine_resolve_failed(engine *e, PyObject *args)
{
    unsigned long long token;
    int error;
    PyObject *text = NULL;
    if (!PyArg_ParseTuple(args, "Ki|O", &token, &error, &text) || engine_enter(e) < 0)
        return NULL;
    conn *c = find_resolving(e, token);
    if (c == NULL)
        return engine_leave(e, Py_NewRef(Py_False));
    connect_resolve_failed(e, c, error > 0 ? error : EHOSTUNREACH);
    return engine_leave(e, Py_NewRef(Py_True));
}

static PyObject *engine_retry_held(engine *e, PyObject *unused)
{
    (void)unused;
    if (engine_enter(e) < 0)
        return NULL;
    admit_held(e);
    return engine_leave(e, Py_NewRef(e->held_fd >= 0 ? Py_False : Py_True));
}

static PyObject *engine_close(engine *e, PyObject *unused)
{
    (void)unused;
    if (e->dispatching) {
        PyErr_SetString(PyExc_RuntimeError, "close() called from a hook");
        return NULL;
    }
    engine_release(e);
    Py_RETURN_NONE;
}

static PyObject *engine_stats(engine *e, PyObject *unused)
{
    (void)unused;
    long relaying = 0, connecting = 0;
    int pooled = 0;
    for (int i = 0; i < e->npools; i++)
        pooled += e->pools[i].count;
    for (struct link *l = e->conns.next; l != &e->conns; l = l->next) {
        if (container_of(l, conn, all)->state == CONN_RELAYING)
            relaying++;
        else
            connecting++;
    }
    return Py_BuildValue("{sKsKsKsKslslsislsisNsKsl}", "dispatches",
                         (unsigned long long)e->stat_dispatches, "events",
                         (unsigned long long)e->stat_events, "pumps",
                         (unsigned long long)e->stat_pumps, "timer_fires",
                         (unsigned long long)e->stat_timer_fires, "relaying", relaying,
                         "connecting", connecting, "pipes_pooled", pooled, "pipes_in_use",
                         e->pipes_in_use, "held", e->held_fd >= 0,
                         "accepting", PyBool_FromLong(e->accepting), "sessions_opened",
                         (unsigned long long)e->stat_sessions, "sessions", e->nsessions);
}

static PyObject *engine_layout(engine *e, PyObject *unused)
{
    (void)unused;
    return layout_dict(e);
}

static PyMethodDef engine_methods[] = {
    {"fileno", (PyCFunction)engine_fileno, METH_NOARGS, "The epoll fd: readable when dispatch() has work."},
    {"dispatch", (PyCFunction)engine_dispatch, METH_NOARGS, "Run one batch of ready events and due timers."},
    {"start_accepting", (PyCFunction)engine_start_accepting, METH_NOARGS, "Watch the listeners."},
    {"stop_accepting", (PyCFunction)(void (*)(void))engine_stop_accepting, METH_VARARGS | METH_KEYWORDS,
     "Stop watching the listeners (before closing them); drain=True: hooks.on_drained once nothing is open."},
    {"open_connections", (PyCFunction)engine_open_connections, METH_NOARGS, "Admitted and not yet closed."},
    {"open_sessions", (PyCFunction)engine_open_sessions, METH_NOARGS, "Datagram sessions open."},
    {"set_fd_ceiling", (PyCFunction)engine_set_fd_ceiling, METH_O,
     "Pause accepting from this descriptor number on (-1: never); measured once the "
     "worker's own descriptors are open."},
    {"holding", (PyCFunction)engine_holding, METH_NOARGS,
     "Queue mode: a client is held, waiting for capacity."},
    {"close_all", (PyCFunction)engine_close_all, METH_NOARGS,
     "The graceful timeout: refuse a held client, close connecting ones, abort relays."},
    {"resolved", (PyCFunction)engine_resolved, METH_VARARGS, "resolved(token, addresses): hooks.resolve's answer."},
    {"resolve_failed", (PyCFunction)engine_resolve_failed, METH_VARARGS, "resolve_failed(token, errno[, text])."},
    {"retry_held", (PyCFunction)engine_retry_held, METH_NOARGS, "Queue mode: try to admit the held client again."},
    {"close", (PyCFunction)engine_close, METH_NOARGS, "Close every connection and the engine's fds."},
    {"stats", (PyCFunction)engine_stats, METH_NOARGS, "Internal counts, for tests."},
    {"layout", (PyCFunction)engine_layout, METH_NOARGS,
     "The layout the engine took, by engine_offsets() name (for the agreement test)."},
    {NULL, NULL, 0, NULL},
};

PyTypeObject EngineType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "forkproxy.relay._engine.Engine",
    .tp_basicsize = sizeof(engine),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Engine(memory, layout, slot, listeners, routes, hooks, *, connect_timeout=0, "
              "idle_timeout=0, proxy_protocol=0, tcp_options=(), pipe_size=0, pipe_keep=4, "
              "fd_ceiling=-1, queue_on_limit=False, copy_size=0, datagram_listeners=(), "
              "datagram_buffer=65536)",
    .tp_new = engine_new,
    .tp_dealloc = (destructor)engine_dealloc,
    .tp_methods = engine_methods,
};
