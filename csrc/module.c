/* forkproxy.relay._engine: the Engine type, its configuration, and the calls to Python.
 *
 * Python calls in (dispatch, start/stop_accepting, resolved, ...); the engine calls out
 * only at the end of an outermost call, never with a connection half-handled: hooks.
 * resolve for host-name targets, hooks.on_event for conditions (at most once a second per
 * kind, with a count), hooks.on_idle when the last connection closed, hooks.on_drained
 * once draining found nothing left, hooks.on_capacity_wait in queue mode. A hook may call
 * the engine back (but not dispatch or close). The first exception a hook raises is
 * raised from the call that ran it, after the engine has finished its work: a failed
 * resolve fails that target attempt, nothing leaks.
 */
#include "engine.h"

#include <arpa/inet.h>
#include <errno.h>
#include <linux/vm_sockets.h>
#include <math.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/un.h>
#include <unistd.h>

#define EVENT_INTERVAL_NS 1000000000LL

static PyTypeObject EngineType;

/* -- configuration ------------------------------------------------------------------ */

static PyObject *layout_item(PyObject *layout, const char *name)
{
    if (PyMapping_Check(layout) && !PyTuple_Check(layout) && !PyList_Check(layout))
        return PyMapping_GetItemString(layout, name);
    return PyObject_GetAttrString(layout, name);
}

/* A byte offset or size from the layout; `optional` ones default to 0 (feature off). */
static int layout_size(PyObject *layout, const char *name, size_t *out, bool optional)
{
    PyObject *v = layout_item(layout, name);
    if (v == NULL) {
        if (optional && (PyErr_ExceptionMatches(PyExc_KeyError) ||
                         PyErr_ExceptionMatches(PyExc_AttributeError))) {
            PyErr_Clear();
            *out = 0;
            return 0;
        }
        return -1;
    }
    Py_ssize_t n = PyNumber_AsSsize_t(v, PyExc_OverflowError);
    Py_DECREF(v);
    if (n == -1 && PyErr_Occurred())
        return -1;
    if (n < 0) {
        PyErr_Format(PyExc_ValueError, "layout field %s is negative", name);
        return -1;
    }
    *out = (size_t)n;
    return 0;
}

static int layout_bounds(PyObject *layout, const char *name, struct histogram *h)
{
    PyObject *v = layout_item(layout, name);
    if (v == NULL)
        return -1;
    PyObject *seq = PySequence_Fast(v, "histogram bounds must be a sequence");
    Py_DECREF(v);
    if (seq == NULL)
        return -1;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    if (n > MAX_BOUNDS) {
        Py_DECREF(seq);
        PyErr_Format(PyExc_ValueError, "%s: at most %d bounds", name, MAX_BOUNDS);
        return -1;
    }
    h->count = (int)n;
    for (Py_ssize_t i = 0; i < n; i++) {
        double s = PyFloat_AsDouble(PySequence_Fast_GET_ITEM(seq, i));
        if (s == -1.0 && PyErr_Occurred()) {
            Py_DECREF(seq);
            return -1;
        }
        h->bound_ns[i] = (int64_t)llround(s * 1e9);
    }
    Py_DECREF(seq);
    return 0;
}

static int parse_layout(engine *e, PyObject *layout)
{
    struct layout *l = &e->lay;
    struct {
        const char *name;
        size_t *field;
        bool optional;
    } fields[] = {
        {"mutex", &l->mutex, false},
        {"capacity", &l->capacity, false},
        {"slot_high_water", &l->slot_high_water, false},
        {"capacity_seq", &l->capacity_seq, true},
        {"waiters", &l->waiters, true},
        {"source_limit", &l->source_limit, true},
        {"source_entries", &l->source_entries, true},
        {"source_dirty", &l->source_dirty, true},
        {"source_table", &l->source_table, true},
        {"source_row_bytes", &l->source_row_bytes, true},
        {"source_counts", &l->source_counts, true},
        {"slots", &l->slots, false},
        {"slot_bytes", &l->slot_bytes, false},
        {"max_slots", &l->max_slots, false},
        {"held", &l->held, false},
        {"active", &l->active, false},
        {"accepted", &l->accepted, false},
        {"refused", &l->refused, false},
        {"connect_errors", &l->connect_errors, false},
        {"bytes_to_target", &l->bytes_to_target, false},
        {"bytes_to_client", &l->bytes_to_client, false},
        {"closed", &l->closed, false},
        {"last_activity_ns", &l->last_activity_ns, false},
        {"connect_duration_buckets", &l->connect_buckets, false},
        {"connect_duration_sum_ns", &l->connect_sum_ns, false},
        {"connection_duration_buckets", &l->connection_buckets, false},
        {"connection_duration_sum_ns", &l->connection_sum_ns, false},
    };
    for (size_t i = 0; i < sizeof fields / sizeof fields[0]; i++)
        if (layout_size(layout, fields[i].name, fields[i].field, fields[i].optional) < 0)
            return -1;
    if (layout_bounds(layout, "connect_duration_bounds", &e->connect_hist) < 0 ||
        layout_bounds(layout, "connection_duration_bounds", &e->connection_hist) < 0)
        return -1;
    e->connect_hist.buckets = l->connect_buckets;
    e->connect_hist.sum_ns = l->connect_sum_ns;
    e->connection_hist.buckets = l->connection_buckets;
    e->connection_hist.sum_ns = l->connection_sum_ns;

    size_t size = (size_t)e->memory.len;
    size_t slot_end = l->slots + l->max_slots * l->slot_bytes;
    size_t slot_fields[] = {l->held, l->active, l->accepted, l->refused, l->connect_errors,
                            l->bytes_to_target, l->bytes_to_client, l->closed,
                            l->last_activity_ns,
                            l->connect_buckets + 8 * (size_t)e->connect_hist.count,
                            l->connect_sum_ns,
                            l->connection_buckets + 8 * (size_t)e->connection_hist.count,
                            l->connection_sum_ns};
    bool ok = l->max_slots > 0 && e->slot_index < l->max_slots && slot_end <= size &&
              l->mutex + sizeof(pthread_mutex_t) <= size && l->mutex % 8 == 0 &&
              l->capacity + 8 <= size && l->slot_high_water + 8 <= size &&
              l->capacity_seq % 4 == 0 && l->waiters % 4 == 0 && l->capacity_seq + 4 <= size &&
              l->waiters + 4 <= size;
    for (size_t i = 0; ok && i < sizeof slot_fields / sizeof slot_fields[0]; i++)
        ok = slot_fields[i] % 8 == 0 && slot_fields[i] + 8 <= l->slot_bytes;
    if (ok && l->source_table) {
        ok = l->source_limit + 8 <= size && l->source_entries + 8 <= size &&
             l->source_dirty + 8 <= size && l->source_row_bytes >= 16 &&
             l->source_counts >= 16 && l->source_counts % 2 == 0 &&
             l->source_counts + 2 * l->max_slots <= l->source_row_bytes &&
             l->source_table < size;
    }
    if (!ok) {
        PyErr_SetString(PyExc_ValueError,
                        "the layout does not fit the shared mapping (see csrc/README.md)");
        return -1;
    }
    e->base = e->memory.buf;
    e->slot = e->base + l->slots + e->slot_index * l->slot_bytes;
    return 0;
}

/* A Python socket address of `family` (what the socket module takes) to a sockaddr. */
static int to_sockaddr(int family, PyObject *obj, struct sockaddr_storage *ss, socklen_t *len)
{
    memset(ss, 0, sizeof *ss);
    if (family == AF_INET || family == AF_INET6) {
        const char *host;
        int port;
        unsigned flow = 0, scope = 0;
        if (!PyArg_ParseTuple(obj, "si|II", &host, &port, &flow, &scope))
            return -1;
        if (port < 0 || port > 65535) {
            PyErr_Format(PyExc_ValueError, "port %d out of range", port);
            return -1;
        }
        if (family == AF_INET) {
            struct sockaddr_in *in = (struct sockaddr_in *)ss;
            in->sin_family = AF_INET;
            in->sin_port = htons((uint16_t)port);
            if (inet_pton(AF_INET, host, &in->sin_addr) != 1)
                goto bad;
            *len = sizeof *in;
        } else {
            struct sockaddr_in6 *in6 = (struct sockaddr_in6 *)ss;
            char text[INET6_ADDRSTRLEN];
            size_t n = strcspn(host, "%");
            if (n >= sizeof text)
                goto bad;
            memcpy(text, host, n);
            text[n] = 0;
            in6->sin6_family = AF_INET6;
            in6->sin6_port = htons((uint16_t)port);
            in6->sin6_flowinfo = htonl(flow);
            in6->sin6_scope_id = scope;
            if (inet_pton(AF_INET6, text, &in6->sin6_addr) != 1)
                goto bad;
            *len = sizeof *in6;
        }
        return 0;
    }
    if (family == AF_UNIX) {
        struct sockaddr_un *un = (struct sockaddr_un *)ss;
        PyObject *bytes = PyUnicode_Check(obj) ? PyUnicode_EncodeFSDefault(obj) : Py_NewRef(obj);
        if (bytes == NULL)
            return -1;
        char *data;
        Py_ssize_t n;
        if (PyBytes_AsStringAndSize(bytes, &data, &n) < 0) {
            Py_DECREF(bytes);
            return -1;
        }
        if (n == 0 || (size_t)n > sizeof un->sun_path - (data[0] != 0)) {
            Py_DECREF(bytes);
            goto bad;
        }
        un->sun_family = AF_UNIX;
        memcpy(un->sun_path, data, (size_t)n);
        *len = (socklen_t)(offsetof(struct sockaddr_un, sun_path) + (size_t)n + (data[0] != 0));
        Py_DECREF(bytes);
        return 0;
    }
    if (family == AF_VSOCK) {
        struct sockaddr_vm *vm = (struct sockaddr_vm *)ss;
        unsigned cid, port;
        if (!PyArg_ParseTuple(obj, "II", &cid, &port))
            return -1;
        vm->svm_family = AF_VSOCK;
        vm->svm_cid = cid;
        vm->svm_port = port;
        *len = sizeof *vm;
        return 0;
    }
    PyErr_Format(PyExc_ValueError, "unsupported address family %d", family);
    return -1;
bad:
    PyErr_SetString(PyExc_ValueError, "invalid socket address");
    return -1;
}

static int int_attr(PyObject *obj, const char *name, long *out)
{
    PyObject *v = PyObject_GetAttrString(obj, name);
    if (v == NULL)
        return -1;
    *out = PyLong_AsLong(v);
    Py_DECREF(v);
    return *out == -1 && PyErr_Occurred() ? -1 : 0;
}

static int parse_target(struct target *t, PyObject *obj)
{
    long family, port;
    t->object = Py_NewRef(obj);
    if (int_attr(obj, "family", &family) < 0)
        return -1;
    t->family = (int)family;
    if (family == 0) {
        t->host = PyObject_GetAttrString(obj, "host");
        if (t->host == NULL || int_attr(obj, "port", &port) < 0)
            return -1;
        t->port = (int)port;
        return 0;
    }
    PyObject *sockaddr = PyObject_GetAttrString(obj, "sockaddr");
    if (sockaddr == NULL)
        return -1;
    int rc = to_sockaddr((int)family, sockaddr, &t->addr, &t->addrlen);
    Py_DECREF(sockaddr);
    return rc;
}

static int parse_routes(engine *e, PyObject *routes)
{
    PyObject *seq = PySequence_Fast(routes, "routes must be a sequence of target sequences");
    if (seq == NULL)
        return -1;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    e->routes = PyMem_Calloc((size_t)n + 1, sizeof *e->routes);
    if (e->routes == NULL) {
        Py_DECREF(seq);
        PyErr_NoMemory();
        return -1;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *targets = PySequence_Fast(PySequence_Fast_GET_ITEM(seq, i),
                                            "a route must be a sequence of targets");
        if (targets == NULL)
            goto fail;
        Py_ssize_t count = PySequence_Fast_GET_SIZE(targets);
        struct route *r = &e->routes[i];
        e->nroutes = (int)i + 1;
        r->targets = PyMem_Calloc((size_t)count + 1, sizeof *r->targets);
        if (count < 1 || count > 65535 || r->targets == NULL) {
            Py_DECREF(targets);
            if (r->targets == NULL)
                PyErr_NoMemory();
            else
                PyErr_SetString(PyExc_ValueError, "a route needs 1 to 65535 targets");
            goto fail;
        }
        for (Py_ssize_t j = 0; j < count; j++) {
            r->count = (int)j + 1;
            if (parse_target(&r->targets[j], PySequence_Fast_GET_ITEM(targets, j)) < 0) {
                Py_DECREF(targets);
                goto fail;
            }
        }
        Py_DECREF(targets);
    }
    Py_DECREF(seq);
    return 0;
fail:
    Py_DECREF(seq);
    return -1;
}

static int parse_listeners(engine *e, PyObject *listeners)
{
    PyObject *seq = PySequence_Fast(listeners, "listeners must be a sequence of (fd, route)");
    if (seq == NULL)
        return -1;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    e->listeners = PyMem_Calloc((size_t)n + 1, sizeof *e->listeners);
    if (e->listeners == NULL) {
        Py_DECREF(seq);
        PyErr_NoMemory();
        return -1;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        struct listener *l = &e->listeners[i];
        if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(seq, i), "ii", &l->fd, &l->route))
            goto fail;
        if (l->route < 0 || l->route >= e->nroutes) {
            PyErr_Format(PyExc_ValueError, "listener fd %d: no route %d", l->fd, l->route);
            goto fail;
        }
        socklen_t len = sizeof l->family;
        if (getsockopt(l->fd, SOL_SOCKET, SO_DOMAIN, &l->family, &len) < 0) {
            PyErr_SetFromErrno(PyExc_OSError);
            goto fail;
        }
        l->watch.kind = WATCH_LISTENER;
        l->index = (int)i;
        e->nlisteners = (int)i + 1;
        setup_listener_options(e, l);
    }
    Py_DECREF(seq);
    return 0;
fail:
    Py_DECREF(seq);
    return -1;
}

static int parse_options(engine *e, PyObject *options)
{
    PyObject *seq = PySequence_Fast(options, "tcp_options must be (level, option, value) triples");
    if (seq == NULL)
        return -1;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    if (n > 8) {
        Py_DECREF(seq);
        PyErr_SetString(PyExc_ValueError, "at most 8 TCP options");
        return -1;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        int *opt = e->target_options[i];
        if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(seq, i), "iii", &opt[0], &opt[1], &opt[2])) {
            Py_DECREF(seq);
            return -1;
        }
    }
    e->ntarget_options = (int)n;
    Py_DECREF(seq);
    return 0;
}

static int64_t timeout_ns(double seconds)
{
    if (!(seconds > 0) || isinf(seconds))
        return 0;
    double ns = seconds * 1e9;
    return ns > 9e18 ? 0 : (int64_t)ns;
}

/* -- hooks and events ---------------------------------------------------------------- */

static void keep_error(engine *e)
{
    if (e->error_type == NULL)
        PyErr_Fetch(&e->error_type, &e->error_value, &e->error_tb);
    else
        PyErr_WriteUnraisable((PyObject *)e);
}

void engine_fail_hook(engine *e) { keep_error(e); }

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
        PyObject *subject = st->target ? Py_NewRef(st->target)
                            : st->peerlen ? sockaddr_text((struct sockaddr *)&st->peer, st->peerlen)
                                          : Py_NewRef(Py_None);
        if (subject == NULL) {
            keep_error(e);
            continue;
        }
        PyObject *r = e->hook_event == NULL
                          ? Py_NewRef(Py_None)
                          : PyObject_CallFunction(e->hook_event, "iKi(iO)", code,
                                                  (unsigned long long)count, st->error,
                                                  st->index, subject);
        Py_DECREF(subject);
        if (r == NULL)
            keep_error(e);
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
        struct target *t = &c->route->targets[c->target];
        uint64_t token = c->token;
        PyObject *r = PyObject_CallFunction(e->hook_resolve, "KOi", (unsigned long long)token,
                                            t->host, t->port);
        if (r == NULL) {
            keep_error(e);
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
        keep_error(e);
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
                keep_error(e);
            Py_XDECREF(r);
            more = true;
        }
        if (e->want_idle) {
            e->want_idle = false;
            if (e->open == 0)
                call_hook0(e, e->hook_idle);
            more = true;
        }
        if (e->want_drained && !e->drained_reported && e->open == 0 && e->held_fd < 0) {
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
static int enter(engine *e)
{
    if (e->closed) {
        PyErr_SetString(PyExc_ValueError, "the engine is closed");
        return -1;
    }
    if (!e->dispatching)
        e->now_ns = monotonic_ns();
    return 0;
}

static PyObject *leave(engine *e, PyObject *result)
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

/* -- the Engine type -------------------------------------------------------------------- */

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
        conn_close(e, c, END_NORMAL, 0);
    }
    if (e->held_fd >= 0) {
        close(e->held_fd);
        e->held_fd = -1;
        if (e->base != NULL && e->lay.waiters)
            admission_wait_end(e);
    }
    engine_free_graveyard(e);
    pipe_pool_close(e);
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
    for (int i = 0; i < e->nroutes; i++) {
        for (int j = 0; j < e->routes[i].count; j++) {
            Py_XDECREF(e->routes[i].targets[j].object);
            Py_XDECREF(e->routes[i].targets[j].host);
        }
        PyMem_Free(e->routes[i].targets);
    }
    PyMem_Free(e->routes);
    PyMem_Free(e->listeners);
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
                            NULL};
    PyObject *memory, *layout, *listeners, *routes, *hooks, *tcp_options = NULL;
    Py_ssize_t slot;
    double connect_timeout = 0, idle_timeout = 0;
    int proxy_protocol = 0, pipe_size = 0, pipe_keep = 4, fd_ceiling = -1, queue = 0;
    int copy_size = COPY_SIZE_DEFAULT;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOnOOO|$ddiOiiipi", names, &memory, &layout,
                                     &slot, &listeners, &routes, &hooks, &connect_timeout,
                                     &idle_timeout, &proxy_protocol, &tcp_options, &pipe_size,
                                     &pipe_keep, &fd_ceiling, &queue, &copy_size))
        return NULL;
    if (proxy_protocol < 0 || proxy_protocol > 2 || slot < 0 || pipe_size < 0 || copy_size < 0 ||
        copy_size > COPY_SIZE_MAX) {
        PyErr_SetString(PyExc_ValueError, "invalid proxy_protocol, slot, pipe_size or copy_size");
        return NULL;
    }
    engine *e = (engine *)type->tp_alloc(type, 0);
    if (e == NULL)
        return NULL;
    e->epfd = e->timerfd = e->held_fd = -1;
    list_init(&e->conns);
    list_init(&e->connecting);
    list_init(&e->idle);
    list_init(&e->runq);
    list_init(&e->resolveq);
    list_init(&e->retryq);
    list_init(&e->graveyard);
    e->slot_index = (size_t)slot;
    e->proxy_protocol = proxy_protocol;
    e->pipe_size = pipe_size;
    e->pipe_keep = pipe_keep < 0 ? 0 : pipe_keep > PIPE_POOL_MAX ? PIPE_POOL_MAX : pipe_keep;
    e->fd_ceiling = fd_ceiling < 0 ? INT32_MAX : fd_ceiling;
    e->queue_on_limit = queue != 0;
    e->copy_size = copy_size;
    if (copy_size && (e->copybuf = PyMem_Malloc((size_t)copy_size)) == NULL) {
        PyErr_NoMemory();
        goto fail;
    }
    e->connect_timeout_ns = timeout_ns(connect_timeout);
    e->idle_timeout_ns = timeout_ns(idle_timeout);
    if (PyObject_GetBuffer(memory, &e->memory, PyBUF_WRITABLE) < 0)
        goto fail;
    e->have_memory = true;
    if (parse_layout(e, layout) < 0 || (tcp_options && parse_options(e, tcp_options) < 0) ||
        parse_routes(e, routes) < 0 || parse_listeners(e, listeners) < 0)
        goto fail;
    e->hook_resolve = hook_attr(hooks, "resolve", false);
    e->hook_event = hook_attr(hooks, "on_event", false);
    e->hook_idle = hook_attr(hooks, "on_idle", false);
    e->hook_drained = hook_attr(hooks, "on_drained", false);
    e->hook_capacity = hook_attr(hooks, "on_capacity_wait", false);
    if (PyErr_Occurred())
        goto fail;
    for (int i = 0; i < e->nroutes; i++)
        for (int j = 0; j < e->routes[i].count; j++)
            if (e->routes[i].targets[j].family == 0 && e->hook_resolve == NULL) {
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
    if (enter(e) < 0)
        return NULL;
    if (e->dispatching) {
        PyErr_SetString(PyExc_RuntimeError, "dispatch() called from a hook");
        return NULL;
    }
    e->dispatching = true;
    loop_dispatch(e);
    e->dispatching = false;
    return leave(e, Py_NewRef(Py_None));
}

static PyObject *engine_start_accepting(engine *e, PyObject *unused)
{
    (void)unused;
    if (enter(e) < 0)
        return NULL;
    if (e->draining) {
        PyErr_SetString(PyExc_RuntimeError, "the engine is draining");
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
    return leave(e, Py_NewRef(Py_None));
}

static PyObject *engine_stop_accepting(engine *e, PyObject *args, PyObject *kwargs)
{
    static char *names[] = {"drain", NULL};
    int drain = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "|$p", names, &drain) || enter(e) < 0)
        return NULL;
    listeners_unregister(e);
    e->accepting = false;
    e->accept_resume_ns = 0;
    if (drain && !e->draining) {
        e->draining = true;
        e->want_drained = true;
    }
    return leave(e, Py_NewRef(Py_None));
}

static PyObject *engine_open_connections(engine *e, PyObject *unused)
{
    (void)unused;
    return PyLong_FromLong(e->open);
}

static PyObject *engine_close_all(engine *e, PyObject *unused)
{
    (void)unused;
    if (enter(e) < 0)
        return NULL;
    if (e->held_fd >= 0) {
        slot_add(e, e->lay.refused, 1);
        close(e->held_fd);
        e->held_fd = -1;
        e->want_capacity = false;
        admission_wait_end(e);
        e->want_drained = e->draining;
    }
    while (!list_empty(&e->conns))
        conn_close(e, container_of(e->conns.next, conn, all), END_NORMAL, 0);
    return leave(e, Py_NewRef(Py_None));
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
    if (!PyArg_ParseTuple(args, "KO", &token, &addrs) || enter(e) < 0)
        return NULL;
    PyObject *seq = PySequence_Fast(addrs, "addresses must be a sequence");
    if (seq == NULL)
        return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    struct sockaddr_storage *list = PyMem_Calloc((size_t)n + 1, sizeof *list);
    if (list == NULL) {
        Py_DECREF(seq);
        return PyErr_NoMemory();
    }
    int count = 0;
    for (Py_ssize_t i = 0; i < n && count < 64; i++) {
        PyObject *item = PySequence_Fast_GET_ITEM(seq, i);
        /* (family, sockaddr) or getaddrinfo's (family, type, proto, canonname, sockaddr) */
        Py_ssize_t len = PyTuple_Check(item) ? PyTuple_GET_SIZE(item) : 0;
        if (len != 2 && len != 5) {
            PyErr_SetString(PyExc_TypeError, "an address is (family, sockaddr)");
            goto fail;
        }
        long family = PyLong_AsLong(PyTuple_GET_ITEM(item, 0));
        if (family == -1 && PyErr_Occurred())
            goto fail;
        socklen_t slen;
        if (family != AF_INET && family != AF_INET6)
            continue;
        if (to_sockaddr((int)family, PyTuple_GET_ITEM(item, len - 1), &list[count], &slen) < 0)
            goto fail;
        count++;
    }
    Py_DECREF(seq);
    conn *c = find_resolving(e, token);
    if (c == NULL) {
        PyMem_Free(list);
        return leave(e, Py_NewRef(Py_False)); /* timed out or closed meanwhile */
    }
    connect_resolved(e, c, list, count);
    return leave(e, Py_NewRef(Py_True));
fail:
    Py_DECREF(seq);
    PyMem_Free(list);
    return NULL;
}

static PyObject *engine_resolve_failed(engine *e, PyObject *args)
{
    unsigned long long token;
    int error;
    PyObject *text = NULL;
    if (!PyArg_ParseTuple(args, "Ki|O", &token, &error, &text) || enter(e) < 0)
        return NULL;
    conn *c = find_resolving(e, token);
    if (c == NULL)
        return leave(e, Py_NewRef(Py_False));
    connect_resolve_failed(e, c, error > 0 ? error : EHOSTUNREACH);
    return leave(e, Py_NewRef(Py_True));
}

static PyObject *engine_retry_held(engine *e, PyObject *unused)
{
    (void)unused;
    if (enter(e) < 0)
        return NULL;
    admit_held(e);
    return leave(e, Py_NewRef(e->held_fd >= 0 ? Py_False : Py_True));
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
    for (struct link *l = e->conns.next; l != &e->conns; l = l->next) {
        if (container_of(l, conn, all)->state == CONN_RELAYING)
            relaying++;
        else
            connecting++;
    }
    return Py_BuildValue("{sKsKsKsKslslsislsisN}", "dispatches",
                         (unsigned long long)e->stat_dispatches, "events",
                         (unsigned long long)e->stat_events, "pumps",
                         (unsigned long long)e->stat_pumps, "timer_fires",
                         (unsigned long long)e->stat_timer_fires, "relaying", relaying,
                         "connecting", connecting, "pipes_pooled", e->npool, "pipes_in_use",
                         e->pipes_in_use, "held", e->held_fd >= 0,
                         "accepting", PyBool_FromLong(e->accepting));
}

static PyMethodDef engine_methods[] = {
    {"fileno", (PyCFunction)engine_fileno, METH_NOARGS, "The epoll fd: readable when dispatch() has work."},
    {"dispatch", (PyCFunction)engine_dispatch, METH_NOARGS, "Run one batch of ready events and due timers."},
    {"start_accepting", (PyCFunction)engine_start_accepting, METH_NOARGS, "Watch the listeners."},
    {"stop_accepting", (PyCFunction)(void (*)(void))engine_stop_accepting, METH_VARARGS | METH_KEYWORDS,
     "Stop watching the listeners (before closing them); drain=True: hooks.on_drained once nothing is open."},
    {"open_connections", (PyCFunction)engine_open_connections, METH_NOARGS, "Admitted and not yet closed."},
    {"close_all", (PyCFunction)engine_close_all, METH_NOARGS, "End every connection now."},
    {"resolved", (PyCFunction)engine_resolved, METH_VARARGS, "resolved(token, addresses): hooks.resolve's answer."},
    {"resolve_failed", (PyCFunction)engine_resolve_failed, METH_VARARGS, "resolve_failed(token, errno[, text])."},
    {"retry_held", (PyCFunction)engine_retry_held, METH_NOARGS, "Queue mode: try to admit the held client again."},
    {"close", (PyCFunction)engine_close, METH_NOARGS, "Close every connection and the engine's fds."},
    {"stats", (PyCFunction)engine_stats, METH_NOARGS, "Internal counts, for tests."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject EngineType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "forkproxy.relay._engine.Engine",
    .tp_basicsize = sizeof(engine),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Engine(memory, layout, slot, listeners, routes, hooks, *, connect_timeout=0, "
              "idle_timeout=0, proxy_protocol=0, tcp_options=(), pipe_size=0, pipe_keep=4, "
              "fd_ceiling=-1, queue_on_limit=False)",
    .tp_new = engine_new,
    .tp_dealloc = (destructor)engine_dealloc,
    .tp_methods = engine_methods,
};

/* -- module functions (for the Python side's agreement tests) ------------------------- */

static PyObject *mod_encode_proxy_header(PyObject *self, PyObject *args)
{
    (void)self;
    int version, family;
    PyObject *client, *local;
    if (!PyArg_ParseTuple(args, "iiOO", &version, &family, &client, &local))
        return NULL;
    struct sockaddr_storage a = {.ss_family = AF_UNSPEC}, b = {.ss_family = AF_UNSPEC};
    socklen_t alen, blen;
    if ((family == AF_INET || family == AF_INET6) &&
        (to_sockaddr(family, client, &a, &alen) < 0 || to_sockaddr(family, local, &b, &blen) < 0))
        return NULL;
    char out[PROXY_HEADER_MAX];
    int n = proxy_header_encode(version, (struct sockaddr *)&a, (struct sockaddr *)&b, out,
                                sizeof out);
    if (n < 0 || (version != 1 && version != 2)) {
        PyErr_SetString(PyExc_ValueError, "cannot encode this header");
        return NULL;
    }
    return PyBytes_FromStringAndSize(out, n);
}

static PyObject *mod_source_row(PyObject *self, PyObject *args)
{
    (void)self;
    Py_buffer key;
    unsigned long long entries;
    if (!PyArg_ParseTuple(args, "y*K", &key, &entries))
        return NULL;
    if (key.len != 16 || entries == 0) {
        PyBuffer_Release(&key);
        PyErr_SetString(PyExc_ValueError, "a key is 16 bytes, entries > 0");
        return NULL;
    }
    uint64_t lo, hi;
    memcpy(&lo, key.buf, 8);
    memcpy(&hi, (char *)key.buf + 8, 8);
    PyBuffer_Release(&key);
    uint64_t h = (lo * UINT64_C(0x9E3779B97F4A7C15)) ^ hi;
    h *= UINT64_C(0xC2B2AE3D27D4EB4F);
    h ^= h >> 29;
    return PyLong_FromUnsignedLongLong(h % entries);
}

static PyMethodDef module_methods[] = {
    {"encode_proxy_header", mod_encode_proxy_header, METH_VARARGS,
     "encode_proxy_header(version, family, client, local) -> bytes, as the engine sends it."},
    {"source_row", mod_source_row, METH_VARARGS,
     "source_row(key, entries) -> the per-source row a probe for key starts at."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, .m_name = "forkproxy.relay._engine",
    .m_doc = "The compiled relay engine (csrc/README.md).", .m_size = -1,
    .m_methods = module_methods,
};

PyMODINIT_FUNC PyInit__engine(void)
{
    if (PyType_Ready(&EngineType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    static const char *events[] = {"EVENT_REFUSED_CAP",   "EVENT_REFUSED_SOURCE",
                                   "EVENT_REFUSED_BUSY",  "EVENT_CONNECT_FAILED",
                                   "EVENT_TARGET_FAILED", "EVENT_ACCEPT_ERROR",
                                   "EVENT_FD_LOW",        "EVENT_RELAY_ERROR"};
    for (int i = 0; i < EVENT_KINDS; i++)
        if (PyModule_AddIntConstant(m, events[i], i) < 0)
            goto fail;
    if (PyModule_AddIntConstant(m, "MUTEX_SIZE", (long)sizeof(pthread_mutex_t)) < 0 ||
        PyModule_AddIntConstant(m, "LAYOUT_VERSION", 2) < 0 ||
        PyModule_AddObjectRef(m, "Engine", (PyObject *)&EngineType) < 0)
        goto fail;
    return m;
fail:
    Py_DECREF(m);
    return NULL;
}
