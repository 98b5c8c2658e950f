/* Bit packing of the wire formats (see _bits.pyi and heinfer.he.backend.pack_bits): value k of
 * a run occupies bits [k*bits, (k+1)*bits) of one little-endian bit stream. Plain loops over
 * any width 1..64, in place of numpy's gathers and strided windows. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#if __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "the formats are little-endian and so are the 64-bit loads and stores here"
#endif

static PyObject *pack_into(PyObject *self, PyObject *args) {
    Py_buffer values, out;
    int bits;
    Py_ssize_t offset;
    if (!PyArg_ParseTuple(args, "y*iw*n", &values, &bits, &out, &offset)) return NULL;
    PyObject *result = NULL;
    Py_ssize_t count = values.len / 8;
    if (bits < 1 || bits > 64 || values.len % 8 || offset < 0 ||
        offset > out.len || (count * (Py_ssize_t)bits + 7) / 8 > out.len - offset) {
        PyErr_SetString(PyExc_ValueError, "pack_into: bad width, values or output size");
        goto done;
    }
    const uint64_t *v = values.buf;
    unsigned char *o = (unsigned char *)out.buf + offset;
    uint64_t mask = bits == 64 ? UINT64_MAX : ((uint64_t)1 << bits) - 1;
    unsigned __int128 acc = 0; /* pending bits, low first */
    int held = 0;
    Py_ssize_t at = 0;
    for (Py_ssize_t i = 0; i < count; i++) {
        acc |= (unsigned __int128)(v[i] & mask) << held;
        held += bits;
        if (held >= 64) {
            uint64_t word = (uint64_t)acc;
            memcpy(o + at, &word, 8);
            at += 8;
            acc >>= 64;
            held -= 64;
        }
    }
    for (; held > 0; held -= 8, acc >>= 8) o[at++] = (unsigned char)acc;
    result = PyLong_FromSsize_t(offset + (count * (Py_ssize_t)bits + 7) / 8);
done:
    PyBuffer_Release(&values);
    PyBuffer_Release(&out);
    return result;
}

static PyObject *unpack_into(PyObject *self, PyObject *args) {
    Py_buffer data, out;
    int bits;
    if (!PyArg_ParseTuple(args, "y*iw*", &data, &bits, &out)) return NULL;
    PyObject *result = NULL;
    Py_ssize_t count = out.len / 8;
    if (bits < 1 || bits > 64 || out.len % 8 || (count * (Py_ssize_t)bits + 7) / 8 > data.len) {
        PyErr_SetString(PyExc_ValueError, "unpack_into: bad width, data or output size");
        goto done;
    }
    const unsigned char *d = data.buf;
    uint64_t *o = out.buf;
    uint64_t mask = bits == 64 ? UINT64_MAX : ((uint64_t)1 << bits) - 1;
    unsigned __int128 acc = 0;
    int held = 0;
    Py_ssize_t at = 0;
    for (Py_ssize_t i = 0; i < count; i++) {
        if (held < bits && at + 8 <= data.len) {
            uint64_t word;
            memcpy(&word, d + at, 8);
            acc |= (unsigned __int128)word << held;
            held += 64;
            at += 8;
        }
        while (held < bits) {
            acc |= (unsigned __int128)d[at++] << held;
            held += 8;
        }
        o[i] = (uint64_t)acc & mask;
        acc >>= bits;
        held -= bits;
    }
    result = Py_None;
    Py_INCREF(result);
done:
    PyBuffer_Release(&data);
    PyBuffer_Release(&out);
    return result;
}

static PyMethodDef methods[] = {
    {"pack_into", pack_into, METH_VARARGS, NULL},
    {"unpack_into", unpack_into, METH_VARARGS, NULL},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "heinfer.he._bits",
    .m_doc = "Bit packing of heinfer's wire formats.",
    .m_size = -1,
    .m_methods = methods,
};

PyMODINIT_FUNC PyInit__bits(void) {
    PyObject *m = PyModule_Create(&module);
    if (!m) return NULL;
    PyObject *names = Py_BuildValue("[ss]", "pack_into", "unpack_into");
    if (!names || PyModule_AddObject(m, "__all__", names) < 0) {
        Py_XDECREF(names);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
