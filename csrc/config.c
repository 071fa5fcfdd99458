/* The Engine's configuration from Python: the shared mapping's layout, routes and their
 * targets, listeners, TCP options, socket addresses. Checked once, at construction; never
 * touches the mapping's contents and never calls a hook.
 */
#include "engine.h"

#include <arpa/inet.h>
#include <errno.h>
#include <net/if.h>
#include <stdio.h>
#include <stdlib.h>
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

/* Every field of the layout the engine reads, by its name in engine_offsets(). */
static const struct layout_field {
    const char *name;
    size_t offset;             /* in struct layout */
    bool optional;             /* absent or 0: the feature is off (so never at offset 0) */
} layout_fields[] = {
#define FIELD(name, member, optional) {name, offsetof(struct layout, member), optional}
    FIELD("version", version, false),
    FIELD("mutex", mutex, false),
    FIELD("capacity", capacity, false),
    FIELD("slot_high_water", slot_high_water, false),
    FIELD("capacity_seq", capacity_seq, true),
    FIELD("waiters", waiters, true),
    FIELD("source_limit", source_limit, true),
    FIELD("source_entries", source_entries, true),
    FIELD("source_dirty", source_dirty, true),
    FIELD("source_table", source_table, true),
    FIELD("source_row_bytes", source_row_bytes, true),
    FIELD("source_counts", source_counts, true),
    FIELD("slots", slots, false),
    FIELD("slot_bytes", slot_bytes, false),
    FIELD("max_slots", max_slots, false),
    FIELD("held", held, false),
    FIELD("waiting", waiting, false),
    FIELD("active", active, false),
    FIELD("accepted", accepted, false),
    FIELD("refused", refused, false),
    FIELD("connect_errors", connect_errors, false),
    FIELD("bytes_to_target", bytes_to_target, false),
    FIELD("bytes_to_client", bytes_to_client, false),
    FIELD("closed", closed, false),
    FIELD("last_activity_ns", last_activity_ns, false),
    FIELD("connect_duration_buckets", connect_buckets, false),
    FIELD("connect_duration_sum_ns", connect_sum_ns, false),
    FIELD("connection_duration_buckets", connection_buckets, false),
    FIELD("connection_duration_sum_ns", connection_sum_ns, false),
    FIELD("round_robin", round_robin, true),
    FIELD("max_routes", max_routes, false),
    FIELD("listener_rows", listener_rows, true),
    FIELD("max_listeners", max_listeners, false),
    FIELD("target_rows", target_rows, true),
    FIELD("max_targets", max_targets, false),
    FIELD("row_words", row_words, false),
    FIELD("listener_connections", listener_connections, false),
    FIELD("listener_refused", listener_refused, false),
    FIELD("target_active", target_active, false),
    FIELD("target_connections", target_connections, false),
    FIELD("target_bytes_to_target", target_bytes_to_target, false),
    FIELD("target_bytes_to_client", target_bytes_to_client, false),
    FIELD("target_connect_errors", target_connect_errors, false),
    FIELD("targets", targets, true),
    FIELD("target_row_bytes", target_row_bytes, false),
    FIELD("target_up", target_up, false),
    FIELD("target_cooldown_until_ns", target_cooldown_until_ns, false),
    FIELD("dg_sessions_active", dg_sessions_active, false),
    FIELD("dg_sessions", dg_sessions, false),
    FIELD("dg_to_target", dg_to_target, false),
    FIELD("dg_to_client", dg_to_client, false),
    FIELD("dg_bytes_to_target", dg_bytes_to_target, false),
    FIELD("dg_bytes_to_client", dg_bytes_to_client, false),
    FIELD("dg_dropped", dg_dropped, false),
    FIELD("access_log_dropped", access_log_dropped, false),
#undef FIELD
};
#define LAYOUT_FIELDS (sizeof layout_fields / sizeof layout_fields[0])
static const char *const bound_fields[] = {"connect_duration_bounds", "connection_duration_bounds"};

/* The reasons the rows count by, in the engine's order (enum listener_refusal and enum
 * connect_error_reason): the layout's tuples must start with these. */
static const char *const listener_refusals[] = {"cap", "per_source", "busy", "no_target",
                                                 "proxy_header"};
static const char *const connect_error_reasons[] = {"refused", "timeout", "unreachable", "other"};
static const char *const datagram_drop_reasons[] = {"cap", "per_source", "busy", "truncated",
                                                     "send_error", "no_session"};
static const struct reason_field {
    const char *name;
    const char *const *reasons;
    size_t count;
} reason_fields[] = {
    {"listener_refusals", listener_refusals, LISTENER_REFUSALS},
    {"connect_error_reasons", connect_error_reasons, CONNECT_ERROR_REASONS},
    {"datagram_drop_reasons", datagram_drop_reasons, DG_DROP_REASONS},
};
#define REASON_FIELDS (sizeof reason_fields / sizeof reason_fields[0])

static PyObject *reasons_tuple(const struct reason_field *f)
{
    PyObject *t = PyTuple_New((Py_ssize_t)f->count);
    for (size_t i = 0; t != NULL && i < f->count; i++) {
        PyObject *v = PyUnicode_FromString(f->reasons[i]);
        if (v == NULL) {
            Py_CLEAR(t);
            break;
        }
        PyTuple_SET_ITEM(t, (Py_ssize_t)i, v);
    }
    return t;
}

/* The layout's reason tuple `f` starts with the engine's reasons, in its order. */
static int check_reasons(PyObject *layout, const struct reason_field *f)
{
    PyObject *v = layout_item(layout, f->name);
    if (v == NULL)
        return -1;
    PyObject *mine = reasons_tuple(f);
    PyObject *head = mine == NULL ? NULL : PySequence_GetSlice(v, 0, (Py_ssize_t)f->count);
    Py_DECREF(v);
    int same = head == NULL ? -1 : PyObject_RichCompareBool(head, mine, Py_EQ);
    Py_XDECREF(head);
    Py_XDECREF(mine);
    if (same == 0)
        PyErr_Format(PyExc_ValueError, "layout field %s: not the engine's reasons", f->name);
    return same == 1 ? 0 : -1;
}

static size_t *layout_member(struct layout *l, size_t i)
{
    return (size_t *)((char *)l + layout_fields[i].offset);
}

/* The names the engine reads: the module's LAYOUT_FIELDS, for the agreement test. */
PyObject *layout_names(void)
{
    PyObject *names = PyTuple_New((Py_ssize_t)(LAYOUT_FIELDS + 3 + REASON_FIELDS));
    if (names == NULL)
        return NULL;
    Py_ssize_t n = 0;
    PyTuple_SET_ITEM(names, n++, PyUnicode_FromString("layout_version"));
    for (size_t i = 0; i < LAYOUT_FIELDS; i++)
        PyTuple_SET_ITEM(names, n++, PyUnicode_FromString(layout_fields[i].name));
    for (size_t i = 0; i < 2; i++)
        PyTuple_SET_ITEM(names, n++, PyUnicode_FromString(bound_fields[i]));
    for (size_t i = 0; i < REASON_FIELDS; i++)
        PyTuple_SET_ITEM(names, n++, PyUnicode_FromString(reason_fields[i].name));
    for (Py_ssize_t i = 0; i < n; i++)
        if (PyTuple_GET_ITEM(names, i) == NULL) {
            Py_DECREF(names);
            return NULL;
        }
    return names;
}

static PyObject *bounds_tuple(const struct histogram *h)
{
    PyObject *t = PyTuple_New(h->count);
    for (int i = 0; t != NULL && i < h->count; i++) {
        PyObject *v = PyFloat_FromDouble((double)h->bound_ns[i] / 1e9);
        if (v == NULL) {
            Py_CLEAR(t);
            break;
        }
        PyTuple_SET_ITEM(t, i, v);
    }
    return t;
}

/* What the engine took from the layout, by name: Engine.layout(), for the agreement test. */
PyObject *layout_dict(engine *e)
{
    PyObject *d = PyDict_New();
    if (d == NULL)
        return NULL;
    PyObject *v = PyLong_FromLongLong(e->lay.layout_version);
    if (v == NULL || PyDict_SetItemString(d, "layout_version", v) < 0)
        goto fail;
    Py_DECREF(v);
    for (size_t i = 0; i < LAYOUT_FIELDS; i++) {
        v = PyLong_FromSize_t(*layout_member(&e->lay, i));
        if (v == NULL || PyDict_SetItemString(d, layout_fields[i].name, v) < 0)
            goto fail;
        Py_DECREF(v);
    }
    const struct histogram *hists[] = {&e->connect_hist, &e->connection_hist};
    for (size_t i = 0; i < 2; i++) {
        v = bounds_tuple(hists[i]);
        if (v == NULL || PyDict_SetItemString(d, bound_fields[i], v) < 0)
            goto fail;
        Py_DECREF(v);
    }
    for (size_t i = 0; i < REASON_FIELDS; i++) {
        v = reasons_tuple(&reason_fields[i]);
        if (v == NULL || PyDict_SetItemString(d, reason_fields[i].name, v) < 0)
            goto fail;
        Py_DECREF(v);
    }
    return d;
fail:
    Py_XDECREF(v);
    Py_DECREF(d);
    return NULL;
}

int parse_layout(engine *e, PyObject *layout)
{
    struct layout *l = &e->lay;
    PyObject *v = layout_item(layout, "layout_version");
    if (v == NULL)
        return -1;
    l->layout_version = PyLong_AsLongLong(v);
    Py_DECREF(v);
    if (l->layout_version == -1 && PyErr_Occurred())
        return -1;
    for (size_t i = 0; i < LAYOUT_FIELDS; i++)
        if (layout_size(layout, layout_fields[i].name, layout_member(l, i),
                        layout_fields[i].optional) < 0)
            return -1;
    if (layout_bounds(layout, bound_fields[0], &e->connect_hist) < 0 ||
        layout_bounds(layout, bound_fields[1], &e->connection_hist) < 0)
        return -1;
    for (size_t i = 0; i < REASON_FIELDS; i++)
        if (check_reasons(layout, &reason_fields[i]) < 0)
            return -1;
    e->connect_hist.buckets = l->connect_buckets;
    e->connect_hist.sum_ns = l->connect_sum_ns;
    e->connection_hist.buckets = l->connection_buckets;
    e->connection_hist.sum_ns = l->connection_sum_ns;

    size_t size = (size_t)e->memory.len;
    size_t slot_end = l->slots + l->max_slots * l->slot_bytes;
    size_t slot_fields[] = {l->held, l->waiting, l->active, l->accepted, l->refused,
                            l->connect_errors, l->bytes_to_target, l->bytes_to_client,
                            l->closed, l->last_activity_ns,
                            l->connect_buckets + 8 * (size_t)e->connect_hist.count,
                            l->connect_sum_ns,
                            l->connection_buckets + 8 * (size_t)e->connection_hist.count,
                            l->connection_sum_ns};
    bool ok = l->max_slots > 0 && e->slot_index < l->max_slots && slot_end <= size &&
              l->slots % 8 == 0 && l->slot_bytes % 8 == 0 && l->version % 8 == 0 &&
              l->version + 8 <= size && l->mutex + sizeof(pthread_mutex_t) <= size &&
              l->mutex % 8 == 0 && l->capacity % 8 == 0 && l->capacity + 8 <= size &&
              l->slot_high_water % 8 == 0 && l->slot_high_water + 8 <= size &&
              l->capacity_seq % 4 == 0 && l->waiters % 4 == 0 && l->capacity_seq + 4 <= size &&
              l->waiters + 4 <= size;
    for (size_t i = 0; ok && i < sizeof slot_fields / sizeof slot_fields[0]; i++)
        ok = slot_fields[i] % 8 == 0 && slot_fields[i] + 8 <= l->slot_bytes;
    if (ok && l->source_table) {
        ok = l->source_limit % 8 == 0 && l->source_entries % 8 == 0 &&
             l->source_dirty % 8 == 0 && l->source_limit + 8 <= size &&
             l->source_entries + 8 <= size && l->source_dirty + 8 <= size &&
             l->source_row_bytes >= 16 && l->source_row_bytes % 2 == 0 &&
             l->source_counts >= 16 && l->source_counts % 2 == 0 &&
             l->source_counts + 2 * l->max_slots <= l->source_row_bytes &&
             l->source_table <= size;
        if (ok) {
            int64_t entries = *(int64_t *)((char *)e->memory.buf + l->source_entries);
            ok = entries >= 0 &&
                 (uint64_t)entries <= (size - l->source_table) / l->source_row_bytes;
        }
    }
    size_t row_bytes = l->row_words * 8;
    size_t row_fields[] = {l->listener_connections,
                           l->listener_refused + 8 * (LISTENER_REFUSALS - 1),
                           l->target_active, l->target_connections, l->target_bytes_to_target,
                           l->target_bytes_to_client,
                           l->target_connect_errors + 8 * (CONNECT_ERROR_REASONS - 1)};
    for (size_t i = 0; ok && i < sizeof row_fields / sizeof row_fields[0]; i++)
        ok = row_fields[i] % 8 == 0 && row_fields[i] + 8 <= row_bytes;
    if (ok && l->listener_rows)
        ok = l->listener_rows % 8 == 0 &&
             l->listener_rows + l->max_listeners * row_bytes <= l->slot_bytes;
    if (ok && l->target_rows)
        ok = l->target_rows % 8 == 0 && l->target_rows + l->max_targets * row_bytes <= l->slot_bytes;
    if (ok && l->round_robin)
        ok = l->round_robin % 8 == 0 && l->round_robin + l->max_routes * 8 <= size;
    if (ok && l->targets)
        ok = l->targets % 8 == 0 && l->target_row_bytes % 8 == 0 &&
             l->target_up % 8 == 0 && l->target_up + 8 <= l->target_row_bytes &&
             l->target_cooldown_until_ns % 8 == 0 &&
             l->target_cooldown_until_ns + 8 <= l->target_row_bytes &&
             l->targets + l->max_targets * l->target_row_bytes <= size;
    if (!ok) {
        PyErr_SetString(PyExc_ValueError,
                        "the layout does not fit the shared mapping (see csrc/README.md)");
        return -1;
    }
    int64_t version = *(int64_t *)((char *)e->memory.buf + l->version);
    if (version != l->layout_version) {
        PyErr_Format(PyExc_ValueError,
                     "the shared mapping has layout version %lld, the layout given is version %lld",
                     (long long)version, (long long)l->layout_version);
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

/* A copy of `obj`'s str attribute `name` as UTF-8 (lone surrogates kept as the bytes they
 * stand for), or NULL and *len 0 when it has none. -1 on an error. */
static int text_attr(PyObject *obj, const char *name, char **out, size_t *len)
{
    *out = NULL;
    *len = 0;
    PyObject *v = PyObject_GetAttrString(obj, name);
    if (v == NULL) {
        if (!PyErr_ExceptionMatches(PyExc_AttributeError))
            return -1;
        PyErr_Clear();
        return 0;
    }
    PyObject *bytes = PyUnicode_Check(v) ? PyUnicode_AsEncodedString(v, "utf-8", "surrogateescape")
                                         : NULL;
    Py_DECREF(v);
    if (bytes == NULL) {
        PyErr_Clear(); /* not text: no name */
        return 0;
    }
    Py_ssize_t n = PyBytes_GET_SIZE(bytes);
    *out = PyMem_Malloc((size_t)n + 1);
    if (*out == NULL) {
        Py_DECREF(bytes);
        PyErr_NoMemory();
        return -1;
    }
    memcpy(*out, PyBytes_AS_STRING(bytes), (size_t)n + 1);
    *len = (size_t)n;
    Py_DECREF(bytes);
    return 0;
}

static int parse_target(struct target *t, PyObject *obj)
{
    long family, port;
    t->object = Py_NewRef(obj);
    if (text_attr(obj, "text", &t->text, &t->text_len) < 0)
        return -1;
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
    const char *host;
    if (rc == 0 && family == AF_INET6 && PyTuple_Check(sockaddr) && PyTuple_GET_SIZE(sockaddr) >= 1 &&
        (host = PyUnicode_AsUTF8(PyTuple_GET_ITEM(sockaddr, 0))) != NULL) {
        /* fe80::1%eth0: the socket module looks the scope up at each connect; so do we,
         * unless it is a number or the interface is there now. */
        struct sockaddr_in6 *in6 = (struct sockaddr_in6 *)&t->addr;
        const char *percent = strchr(host, '%');
        if (percent != NULL && in6->sin6_scope_id == 0) {
            char *end;
            unsigned long number = strtoul(percent + 1, &end, 10);
            if (percent[1] && *end == 0)
                in6->sin6_scope_id = (uint32_t)number;
            else if ((in6->sin6_scope_id = if_nametoindex(percent + 1)) == 0)
                snprintf(t->scope, sizeof t->scope, "%s", percent + 1);
        }
    }
    Py_DECREF(sockaddr);
    if (rc == 0 && PyErr_Occurred())
        rc = -1;
    return rc;
}

/* A numeric target's address for one connect: 0, or ENODEV while its IPv6 scope's
 * interface is missing. */
int target_address(const struct target *t, struct sockaddr_storage *ss)
{
    memcpy(ss, &t->addr, t->addrlen);
    if (!t->scope[0])
        return 0;
    unsigned index = if_nametoindex(t->scope);
    if (index == 0)
        return ENODEV;
    ((struct sockaddr_in6 *)ss)->sin6_scope_id = index;
    return 0;
}

static int parse_group(struct group *g, PyObject *targets_obj)
{
    PyObject *targets = PySequence_Fast(targets_obj, "a route's targets must be a sequence");
    if (targets == NULL)
        return -1;
    Py_ssize_t count = PySequence_Fast_GET_SIZE(targets);
    if (count < 1 || count > 65535) {
        Py_DECREF(targets);
        PyErr_SetString(PyExc_ValueError, "a route needs 1 to 65535 targets");
        return -1;
    }
    g->targets = PyMem_Calloc((size_t)count, sizeof *g->targets);
    if (g->targets == NULL) {
        Py_DECREF(targets);
        PyErr_NoMemory();
        return -1;
    }
    g->turn = -1;
    for (Py_ssize_t j = 0; j < count; j++) {
        g->count = (int)j + 1;
        g->targets[j].row = -1;
        if (parse_target(&g->targets[j], PySequence_Fast_GET_ITEM(targets, j)) < 0) {
            Py_DECREF(targets);
            return -1;
        }
    }
    Py_DECREF(targets);
    return 0;
}

/* (level, option, value) triples, at most MAX_OPTIONS */
static int parse_tcp_options(PyObject *options, int out[][3], int *count)
{
    *count = 0;
    if (options == NULL || options == Py_None)
        return 0;
    PyObject *seq = PySequence_Fast(options, "tcp_options must be (level, option, value) triples");
    if (seq == NULL)
        return -1;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    if (n > MAX_OPTIONS) {
        Py_DECREF(seq);
        PyErr_Format(PyExc_ValueError, "at most %d TCP options", MAX_OPTIONS);
        return -1;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        int *opt = out[i];
        if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(seq, i), "iii", &opt[0], &opt[1], &opt[2])) {
            Py_DECREF(seq);
            return -1;
        }
    }
    *count = (int)n;
    Py_DECREF(seq);
    return 0;
}

/* A route's attribute (or key, for a dict); NULL without an error when it has none. */
static PyObject *route_item(PyObject *route, const char *name)
{
    PyObject *v;
    if (PyDict_Check(route)) {
        v = PyDict_GetItemString(route, name); /* borrowed */
        return Py_XNewRef(v);
    }
    v = PyObject_GetAttrString(route, name);
    if (v == NULL && PyErr_ExceptionMatches(PyExc_AttributeError))
        PyErr_Clear();
    return v;
}

static int route_double(PyObject *route, const char *name, double *out)
{
    PyObject *v = route_item(route, name);
    if (v == NULL)
        return PyErr_Occurred() ? -1 : 0;
    double d = PyFloat_AsDouble(v);
    Py_DECREF(v);
    if (d == -1.0 && PyErr_Occurred())
        return -1;
    *out = d;
    return 0;
}

static int route_int(PyObject *route, const char *name, long *out)
{
    PyObject *v = route_item(route, name);
    if (v == NULL)
        return PyErr_Occurred() ? -1 : 0;
    long n = PyLong_AsLong(v);
    Py_DECREF(v);
    if (n == -1 && PyErr_Occurred())
        return -1;
    *out = n;
    return 0;
}

/* A group's rows of the target table (`rows`: one per target), its round-robin word
 * (`turn`, -1: none) and --balance first (`first`): then the shared table decides. */
static int parse_shared(engine *e, struct group *g, PyObject *obj)
{
    PyObject *rows = route_item(obj, "rows");
    if (rows == NULL || rows == Py_None) {
        Py_XDECREF(rows);
        return PyErr_Occurred() ? -1 : 0;
    }
    long turn = -1, first = 0;
    PyObject *seq = PySequence_Fast(rows, "a route's rows must be a sequence");
    Py_DECREF(rows);
    if (seq == NULL || route_int(obj, "turn", &turn) < 0 || route_int(obj, "first", &first) < 0)
        goto fail;
    if (PySequence_Fast_GET_SIZE(seq) != g->count || !e->lay.targets || !e->lay.target_rows ||
        turn < -1 || (turn >= 0 && (!e->lay.round_robin || (size_t)turn >= e->lay.max_routes))) {
        PyErr_SetString(PyExc_ValueError, "a route's rows must be one per target, and its turn "
                                          "a round-robin word, in a layout that has them");
        goto fail;
    }
    for (int j = 0; j < g->count; j++) {
        long row = PyLong_AsLong(PySequence_Fast_GET_ITEM(seq, j));
        if (row == -1 && PyErr_Occurred())
            goto fail;
        if (row < 0 || (size_t)row >= e->lay.max_targets) {
            PyErr_Format(PyExc_ValueError, "target row %ld out of range", row);
            goto fail;
        }
        g->targets[j].row = (int)row;
    }
    Py_DECREF(seq);
    g->shared = true;
    g->first = first != 0;
    g->turn = (int)turn;
    return 0;
fail:
    Py_XDECREF(seq);
    return -1;
}

static struct pipe_pool *pool_for(engine *e, int size, int keep)
{
    for (int i = 0; i < e->npools; i++)
        if (e->pools[i].size == size)
            return &e->pools[i];
    struct pipe_pool *p = &e->pools[e->npools++];
    p->size = size;
    p->keep = keep < 0 ? 0 : keep > PIPE_POOL_MAX ? PIPE_POOL_MAX : keep;
    return p;
}

/* A route is a sequence of targets (the Engine's keyword arguments apply), or an object
 * (or dict) with `targets` and any of connect_timeout, idle_timeout, proxy_protocol,
 * tcp_options, pipe_size, pipe_keep, group (routes of one group share their targets'
 * round-robin and cool-down: the first one's targets are the group's), and rows, turn and
 * first (the group's rows of the target table: parse_shared). */
static int parse_route(engine *e, struct route *r, PyObject *obj, const struct route_defaults *d,
                       long *group_ids)
{
    PyObject *targets = route_item(obj, "targets");
    if (targets == NULL && PyErr_Occurred())
        return -1;
    double connect_timeout = d->connect_timeout, idle_timeout = d->idle_timeout;
    long proxy_protocol = d->proxy_protocol, pipe_size = d->pipe_size, pipe_keep = d->pipe_keep;
    long group = -1 - r->index; /* own group unless it names one (>= 0) */
    PyObject *options = NULL;
    if (targets != NULL) {
        options = route_item(obj, "tcp_options");
        if ((options == NULL && PyErr_Occurred()) ||
            route_double(obj, "connect_timeout", &connect_timeout) < 0 ||
            route_double(obj, "idle_timeout", &idle_timeout) < 0 ||
            route_int(obj, "proxy_protocol", &proxy_protocol) < 0 ||
            route_int(obj, "pipe_size", &pipe_size) < 0 ||
            route_int(obj, "pipe_keep", &pipe_keep) < 0 || route_int(obj, "group", &group) < 0)
            goto fail;
    } else {
        targets = Py_NewRef(obj);
    }
    if (proxy_protocol < 0 || proxy_protocol > 2 || pipe_size < 0 || pipe_size > (1 << 30)) {
        PyErr_SetString(PyExc_ValueError, "invalid proxy_protocol or pipe_size");
        goto fail;
    }
    if (parse_tcp_options(options != NULL ? options : d->tcp_options, r->options, &r->noptions) < 0)
        goto fail;
    r->connect_timeout_ns = timeout_ns(connect_timeout);
    r->idle_timeout_ns = timeout_ns(idle_timeout);
    r->proxy_protocol = (int)proxy_protocol;
    r->pool = pool_for(e, (int)pipe_size, (int)pipe_keep);
    group_ids[r->index] = group;
    for (int i = 0; i < r->index; i++)
        if (group_ids[i] == group) {
            r->group = e->routes[i].group;
            break;
        }
    if (r->group == NULL) {
        r->group = &e->groups[e->ngroups++];
        if (parse_group(r->group, targets) < 0 ||
            (targets != obj && parse_shared(e, r->group, obj) < 0))
            goto fail;
    }
    Py_XDECREF(options);
    Py_DECREF(targets);
    return 0;
fail:
    Py_XDECREF(options);
    Py_XDECREF(targets);
    return -1;
}

int parse_routes(engine *e, PyObject *routes, const struct route_defaults *defaults)
{
    PyObject *seq = PySequence_Fast(routes, "routes must be a sequence");
    if (seq == NULL)
        return -1;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    long *group_ids = PyMem_Calloc((size_t)n + 1, sizeof *group_ids);
    e->routes = PyMem_Calloc((size_t)n + 1, sizeof *e->routes);
    e->groups = PyMem_Calloc((size_t)n + 1, sizeof *e->groups);
    e->pools = PyMem_Calloc((size_t)n + 1, sizeof *e->pools);
    int rc = -1;
    if (group_ids == NULL || e->routes == NULL || e->groups == NULL || e->pools == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        struct route *r = &e->routes[i];
        r->index = (int)i;
        list_init(&r->connecting);
        list_init(&r->idle);
        e->nroutes = (int)i + 1;
        if (parse_route(e, r, PySequence_Fast_GET_ITEM(seq, i), defaults, group_ids) < 0)
            goto done;
    }
    rc = 0;
done:
    PyMem_Free(group_ids);
    Py_DECREF(seq);
    return rc;
}

/* [(fd, route[, source_limit[, row]]), ...] */
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
        l->row = -1;
        l->log_fd = -1;
        int format = 0;
        PyObject *name = NULL;
        /* (fd, route[, source_limit, row[, log_fd, log_format, log_name]]) */
        if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(seq, i), "ii|iiiiO", &l->fd, &l->route,
                              &l->source_limit, &l->row, &l->log_fd, &format, &name))
            goto fail;
        l->log_format = format == 1 ? ACCESS_LOG_JSON : ACCESS_LOG_LOGFMT;
        if (name != NULL) {
            PyObject *bytes = PyUnicode_AsEncodedString(name, "utf-8", "surrogateescape");
            if (bytes == NULL)
                goto fail;
            l->log_name_len = (size_t)PyBytes_GET_SIZE(bytes);
            l->log_name = PyMem_Malloc(l->log_name_len + 1);
            if (l->log_name != NULL)
                memcpy(l->log_name, PyBytes_AS_STRING(bytes), l->log_name_len + 1);
            Py_DECREF(bytes);
            if (l->log_name == NULL) {
                PyErr_NoMemory();
                goto fail;
            }
        }
        if (l->route < 0 || l->route >= e->nroutes || l->source_limit < 0 ||
            (l->row >= 0 && (size_t)l->row >= e->lay.max_listeners)) {
            PyErr_Format(PyExc_ValueError, "listener fd %d: no route %d, or a negative limit",
                         l->fd, l->route);
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

int64_t timeout_ns(double seconds)
{
    if (!(seconds > 0) || isinf(seconds))
        return 0;
    double ns = seconds * 1e9;
    return ns > 9e18 ? 0 : (int64_t)ns;
}
