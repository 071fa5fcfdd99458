/* forkproxy.relay._engine: the module, its constants, and the functions the Python side's
 * agreement tests use (the PROXY header encoder, the per-source hash).
 */
#include "engine.h"

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
    unsigned long long entries;
    if (!PyArg_ParseTuple(args, "y*K", &key, &entries))
        return NULL;
    if (key.len != 16 || entries == 0) {
        PyBuffer_Release(&key);
        PyErr_SetString(PyExc_ValueError, "a key is 16 bytes, entries > 0");
        return NULL;
    }
    uint64_t h = source_hash(key.buf);
    PyBuffer_Release(&key);
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
