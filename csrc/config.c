/* The Engine's configuration from Python: the shared mapping's layout, routes and their
 * targets, listeners, TCP options, socket addresses. Checked once, at construction; never
 * touches the mapping's contents and never calls a hook.
 */
#include "engine.h"

#include <arpa/inet.h>
#include <linux/vm_sockets.h>
#include <math.h>
#include <string.h>
#include <sys/un.h>

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

int parse_layout(engine *e, PyObject *layout)
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
int to_sockaddr(int family, PyObject *obj, struct sockaddr_storage *ss, socklen_t *len)
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

int parse_routes(engine *e, PyObject *routes)
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

int parse_listeners(engine *e, PyObject *listeners)
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

int parse_options(engine *e, PyObject *options)
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

int64_t timeout_ns(double seconds)
{
    if (!(seconds > 0) || isinf(seconds))
        return 0;
    double ns = seconds * 1e9;
    return ns > 9e18 ? 0 : (int64_t)ns;
}
