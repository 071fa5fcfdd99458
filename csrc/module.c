/* forkproxy.relay._engine: the module, its constants, and the functions the Python side's
 * agreement tests use (the PROXY header encoder and parser, the per-source hash, the
 * access-log line).
 */
#include "engine.h"

#include <arpa/inet.h>
#include <string.h>

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
    PyObject *entries;
    if (!PyArg_ParseTuple(args, "y*O!", &key, &PyLong_Type, &entries))
        return NULL;
    PyObject *zero = PyLong_FromLong(0);
    int positive = zero == NULL ? -1 : PyObject_RichCompareBool(entries, zero, Py_GT);
    Py_XDECREF(zero);
    if (key.len != 16 || positive != 1) {
        PyBuffer_Release(&key);
        if (positive >= 0)
            PyErr_SetString(PyExc_ValueError, "a key is 16 bytes, entries > 0");
        return NULL;
    }
    uint64_t h = source_hash(key.buf);
    PyBuffer_Release(&key);
    /* As per_source.source_row: the 64-bit hash modulo entries, however large. */
    PyObject *hash = PyLong_FromUnsignedLongLong(h);
    if (hash == NULL)
        return NULL;
    PyObject *row = PyNumber_Remainder(hash, entries);
    Py_DECREF(hash);
    return row;
}

/* (host, port) of a parsed address, as getpeername() gives it. */
static PyObject *address_tuple(const struct sockaddr_storage *ss)
{
    char host[INET6_ADDRSTRLEN];
    const void *addr;
    unsigned port;
    if (ss->ss_family == AF_INET) {
        const struct sockaddr_in *in = (const struct sockaddr_in *)ss;
        addr = &in->sin_addr;
        port = ntohs(in->sin_port);
    } else {
        const struct sockaddr_in6 *in6 = (const struct sockaddr_in6 *)ss;
        addr = &in6->sin6_addr;
        port = ntohs(in6->sin6_port);
    }
    if (inet_ntop(ss->ss_family, addr, host, sizeof host) == NULL)
        return PyErr_SetFromErrno(PyExc_OSError);
    return Py_BuildValue("(sI)", host, port);
}

static PyObject *mod_parse_proxy_header(PyObject *self, PyObject *args)
{
    (void)self;
    Py_buffer data;
    if (!PyArg_ParseTuple(args, "y*", &data))
        return NULL;
    struct ph_result r;
    proxy_header_parse(data.buf, (size_t)data.len, &r);
    PyBuffer_Release(&data);
    if (r.status == PH_NEED_MORE)
        return Py_BuildValue("(sn)", "need-more", (Py_ssize_t)r.at_least);
    if (r.status == PH_ERROR)
        return Py_BuildValue("(ss)", "error", proxy_header_reasons[r.reason]);
    if (!r.has_addresses)
        return Py_BuildValue("(sisiOOn)", "header", r.version,
                             r.command == PH_PROXY ? "PROXY" : "LOCAL", r.family, Py_None,
                             Py_None, (Py_ssize_t)r.length);
    PyObject *source = address_tuple(&r.source);
    if (source == NULL)
        return NULL;
    PyObject *destination = address_tuple(&r.destination);
    if (destination == NULL) {
        Py_DECREF(source);
        return NULL;
    }
    return Py_BuildValue("(sisiNNn)", "header", r.version, "PROXY", r.family, source,
                         destination, (Py_ssize_t)r.length);
}

/* A str as UTF-8 with surrogates kept (Python's "surrogatepass"), as the engine will hold
 * names it was given; bytes as they are (to test what the formatter does with bad UTF-8). */
static PyObject *utf8_of(PyObject *text)
{
    if (PyBytes_Check(text))
        return Py_NewRef(text);
    if (!PyUnicode_Check(text)) {
        PyErr_SetString(PyExc_TypeError, "text fields must be str or bytes");
        return NULL;
    }
    return PyUnicode_AsEncodedString(text, "utf-8", "surrogatepass");
}

static PyObject *mod_format_access_log(PyObject *self, PyObject *args)
{
    (void)self;
    const char *format, *end;
    PyObject *texts[3], *encoded[3] = {NULL, NULL, NULL}, *line = NULL;
    long long end_ns, worker, connect_ns, duration_ns, from_client, to_client;
    if (!PyArg_ParseTuple(args, "sLOOOLLLLLs", &format, &end_ns, &texts[0], &texts[1],
                          &texts[2], &worker, &connect_ns, &duration_ns, &from_client,
                          &to_client, &end))
        return NULL;
    struct access_record r = {.end_ns = end_ns, .worker = worker, .connect_ns = connect_ns,
                              .duration_ns = duration_ns, .bytes_from_client = from_client,
                              .bytes_to_client = to_client, .end = END_REASON_COUNT};
    for (int i = 0; i < END_REASON_COUNT; i++)
        if (strcmp(end, access_log_ends[i]) == 0)
            r.end = (enum end_reason)i;
    enum access_log_format kind = strcmp(format, "json") == 0 ? ACCESS_LOG_JSON : ACCESS_LOG_LOGFMT;
    if (r.end == END_REASON_COUNT || (kind == ACCESS_LOG_LOGFMT && strcmp(format, "logfmt") != 0)) {
        PyErr_SetString(PyExc_ValueError, "unknown end reason or format");
        return NULL;
    }
    for (int i = 0; i < 3; i++)
        if ((encoded[i] = utf8_of(texts[i])) == NULL)
            goto done;
    r.listener = PyBytes_AS_STRING(encoded[0]);
    r.listener_len = (size_t)PyBytes_GET_SIZE(encoded[0]);
    r.client = PyBytes_AS_STRING(encoded[1]);
    r.client_len = (size_t)PyBytes_GET_SIZE(encoded[1]);
    r.target = PyBytes_AS_STRING(encoded[2]);
    r.target_len = (size_t)PyBytes_GET_SIZE(encoded[2]);
    /* The engine's way: one fixed buffer. A line that does not fit is formatted again into
     * one of its length, which tests the length the formatter reports. */
    char buffer[512];
    size_t n = access_log_format(buffer, sizeof buffer, &r, kind);
    if (n <= sizeof buffer) {
        line = PyBytes_FromStringAndSize(buffer, (Py_ssize_t)n);
    } else if ((line = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)n)) != NULL) {
        size_t again = access_log_format(PyBytes_AS_STRING(line), n, &r, kind);
        if (again != n) {
            Py_CLEAR(line);
            PyErr_SetString(PyExc_AssertionError, "the line's length changed");
        }
    }
done:
    for (int i = 0; i < 3; i++)
        Py_XDECREF(encoded[i]);
    return line;
}

/* module.NAME = a tuple of the C table `names`, for tests that it matches Python's */
static int add_names(PyObject *m, const char *name, const char *const *names, int count)
{
    PyObject *tuple = PyTuple_New(count);
    if (tuple == NULL)
        return -1;
    for (int i = 0; i < count; i++) {
        PyObject *text = PyUnicode_FromString(names[i]);
        if (text == NULL) {
            Py_DECREF(tuple);
            return -1;
        }
        PyTuple_SET_ITEM(tuple, i, text);
    }
    int rc = PyModule_AddObjectRef(m, name, tuple);
    Py_DECREF(tuple);
    return rc;
}

static PyMethodDef module_methods[] = {
    {"encode_proxy_header", mod_encode_proxy_header, METH_VARARGS,
     "encode_proxy_header(version, family, client, local) -> bytes, as the engine sends it."},
    {"parse_proxy_header", mod_parse_proxy_header, METH_VARARGS,
     "parse_proxy_header(data) -> ('need-more', at_least) | ('error', reason) | ('header', "
     "version, command, family, source, destination, length), as proxy_header.parse."},
    {"format_access_log", mod_format_access_log, METH_VARARGS,
     "format_access_log(format, end_ns, listener, client, target, worker, connect_ns, "
     "duration_ns, bytes_from_client, bytes_to_client, end) -> the line, as "
     "access_log_format's."},
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
                                   "EVENT_FD_LOW",        "EVENT_RELAY_ERROR",
                                   "EVENT_CONNECT_PAUSED", "EVENT_DG_CAP",
                                   "EVENT_DG_SOURCE",     "EVENT_DG_BUSY",
                                   "EVENT_DG_TRUNCATED",  "EVENT_DG_SEND_ERROR",
                                   "EVENT_DG_REFUSED",    "EVENT_DG_REPLY_ERROR",
                                   "EVENT_DG_NO_SESSION", "EVENT_DG_READ_ERROR",
                                   "EVENT_DG_TARGET_FAILED"};
    _Static_assert(sizeof events / sizeof events[0] == EVENT_KINDS, "a name per event code");
    for (int i = 0; i < EVENT_KINDS; i++)
        if (PyModule_AddIntConstant(m, events[i], i) < 0)
            goto fail;
    PyObject *fields = layout_names();
    if (fields == NULL || PyModule_AddObjectRef(m, "LAYOUT_FIELDS", fields) < 0) {
        Py_XDECREF(fields);
        goto fail;
    }
    Py_DECREF(fields);
    if (add_names(m, "PROXY_HEADER_REASONS", proxy_header_reasons, PH_REASONS) < 0 ||
        add_names(m, "END_REASONS", access_log_ends, END_REASON_COUNT) < 0)
        goto fail;
    if (PyModule_AddIntConstant(m, "PROXY_HEADER_V2_MAX_LENGTH", PH_V2_MAX_LENGTH) < 0 ||
        PyModule_AddIntConstant(m, "ACCESS_LOG_FIXED", ACCESS_LOG_FIXED) < 0 ||
        PyModule_AddIntConstant(m, "MUTEX_SIZE", (long)sizeof(pthread_mutex_t)) < 0 ||
        PyModule_AddIntConstant(m, "NO_TOKEN", NO_TOKEN) < 0 ||
        PyModule_AddObjectRef(m, "Engine", (PyObject *)&EngineType) < 0)
        goto fail;
    return m;
fail:
    Py_DECREF(m);
    return NULL;
}
