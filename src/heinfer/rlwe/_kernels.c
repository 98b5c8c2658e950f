/* Compiled loops for the per-request arithmetic of `heinfer.rlwe` (see _kernels.pyi).
 *
 * Each function is the loop body of one numpy routine in ring.py, encrypt.py or sampling.py,
 * fused into one pass over the data with exact 64/128-bit integer arithmetic where numpy needs
 * digit splits and temporaries. The Python wrappers check dtypes, shapes and contiguity; the
 * functions here check every buffer's length against the sizes they are given, so a wrong
 * call raises ValueError instead of reading out of bounds. The identities are the wrappers'
 * (their docstrings), and tests/test_rlwe*.py compare every wrapper with SEAL's own output.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#if __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "SEAL's streams are read as little-endian words by plain 64-bit loads here"
#endif

typedef unsigned __int128 u128;
typedef __int128 i128;

#define MAX_PRIMES 16
#define MAX_DIGITS 64

/* x mod q for any 64-bit x, with m = floor((2**64 - 1) / q) (Barrett). */
static inline uint64_t barrett(uint64_t x, uint64_t q, uint64_t m) {
    uint64_t r = x - (uint64_t)(((u128)x * m) >> 64) * q;
    while (r >= q) r -= q;
    return r;
}

/* x * w mod q for x < q, with wp = floor(w * 2**64 / q) (Shoup). */
static inline uint64_t mulmod_shoup(uint64_t x, uint64_t w, uint64_t wp, uint64_t q) {
    uint64_t r = x * w - (uint64_t)(((u128)x * wp) >> 64) * q;
    return r >= q ? r - q : r;
}

static int check_len(const Py_buffer *buf, Py_ssize_t items, Py_ssize_t itemsize,
                     const char *name) {
    if (buf->len != items * itemsize) {
        PyErr_Format(PyExc_ValueError, "%s: expected %zd bytes, got %zd", name,
                     items * itemsize, buf->len);
        return -1;
    }
    return 0;
}

/* A tuple of small Python ints into a C array; -1 with ValueError when out of range. */
static int int_tuple(PyObject *tuple, uint64_t *out, Py_ssize_t max, uint64_t limit,
                     const char *name) {
    if (!PyTuple_Check(tuple) || PyTuple_GET_SIZE(tuple) < 1 || PyTuple_GET_SIZE(tuple) > max) {
        PyErr_Format(PyExc_ValueError, "%s: a tuple of 1 to %zd ints", name, max);
        return -1;
    }
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(tuple); i++) {
        unsigned long long v = PyLong_AsUnsignedLongLong(PyTuple_GET_ITEM(tuple, i));
        if (PyErr_Occurred()) return -1;
        if (v < 1 || v > limit) {
            PyErr_Format(PyExc_ValueError, "%s: value out of range", name);
            return -1;
        }
        out[i] = v;
    }
    return 0;
}

/* A layout of digit splits: per prime its digit count and width; returns the digit total. */
static Py_ssize_t digit_layout(PyObject *widths_o, PyObject *digits_o, uint64_t *widths,
                               uint64_t *digits, Py_ssize_t *primes) {
    if (int_tuple(widths_o, widths, MAX_PRIMES, 62, "widths") < 0) return -1;
    if (int_tuple(digits_o, digits, MAX_PRIMES, MAX_DIGITS, "digits") < 0) return -1;
    *primes = PyTuple_GET_SIZE(widths_o);
    if (PyTuple_GET_SIZE(digits_o) != *primes) {
        PyErr_SetString(PyExc_ValueError, "widths and digits differ in length");
        return -1;
    }
    Py_ssize_t total = 0;
    for (Py_ssize_t j = 0; j < *primes; j++) {
        if (widths[j] * digits[j] > 64) {
            PyErr_SetString(PyExc_ValueError, "digits wider than 64 bits");
            return -1;
        }
        total += (Py_ssize_t)digits[j];
    }
    if (total > MAX_DIGITS) {
        PyErr_SetString(PyExc_ValueError, "too many digits");
        return -1;
    }
    return total;
}

static PyObject *fold_digits(PyObject *self, PyObject *args) {
    Py_buffer values, twist, out;
    PyObject *widths_o, *digits_o;
    if (!PyArg_ParseTuple(args, "y*OOy*w*", &values, &widths_o, &digits_o, &twist, &out))
        return NULL;
    PyObject *result = NULL;
    uint64_t widths[MAX_PRIMES], digits[MAX_PRIMES];
    Py_ssize_t primes, half = twist.len / 16, n = 2 * half;
    Py_ssize_t total = digit_layout(widths_o, digits_o, widths, digits, &primes);
    if (total < 0 || check_len(&twist, half, 16, "twist") < 0 ||
        check_len(&values, primes * n, 8, "values") < 0 ||
        check_len(&out, total * half, 16, "out") < 0)
        goto done;
    const uint64_t *v = values.buf;
    const double *tw = twist.buf;
    double *o = out.buf;
    Py_ssize_t row = 0;
    for (Py_ssize_t j = 0; j < primes; j++) {
        const uint64_t *poly = v + j * n;
        uint64_t width = widths[j];
        uint64_t mask = width >= 64 ? ~(uint64_t)0 : ((uint64_t)1 << width) - 1;
        for (uint64_t k = 0; k < digits[j]; k++, row++) {
            double *dst = o + 2 * row * half;
            unsigned shift = (unsigned)(k * width);
            for (Py_ssize_t i = 0; i < half; i++) {
                double re = (double)((poly[i] >> shift) & mask);
                double im = (double)((poly[i + half] >> shift) & mask);
                dst[2 * i] = re * tw[2 * i] - im * tw[2 * i + 1];
                dst[2 * i + 1] = re * tw[2 * i + 1] + im * tw[2 * i];
            }
        }
    }
    result = Py_None;
    Py_INCREF(result);
done:
    PyBuffer_Release(&values);
    PyBuffer_Release(&twist);
    PyBuffer_Release(&out);
    return result;
}

/* V mod q from V mod 2**64 (wrapping) and a float estimate of V/q within 1 of it. */
static inline uint64_t reduce_estimated(uint64_t total, double estimate, int64_t q) {
    int64_t floor = (int64_t)estimate;
    floor -= (double)floor > estimate;
    int64_t r = (int64_t)(total - (uint64_t)floor * (uint64_t)q);
    r += (r >> 63) & q;
    r -= q;
    r += (r >> 63) & q;
    return (uint64_t)r;
}

static PyObject *recombine_digits(PyObject *self, PyObject *args) {
    Py_buffer rounded, out, small = {0};
    PyObject *widths_o, *digits_o, *primes_o, *small_o;
    Py_ssize_t batch;
    if (!PyArg_ParseTuple(args, "y*OOOnOw*", &rounded, &widths_o, &digits_o, &primes_o, &batch,
                          &small_o, &out))
        return NULL;
    PyObject *result = NULL;
    int have_small = small_o != Py_None;
    if (have_small && PyObject_GetBuffer(small_o, &small, PyBUF_SIMPLE) < 0) goto done;
    uint64_t widths[MAX_PRIMES], digits[MAX_PRIMES], qs[MAX_PRIMES];
    Py_ssize_t primes;
    Py_ssize_t total = digit_layout(widths_o, digits_o, widths, digits, &primes);
    Py_ssize_t n = batch > 0 ? out.len / (8 * primes * batch) : 0;
    if (total < 0 || batch < 1 || n < 2 || n % 2 ||
        check_len(&rounded, total * batch * n, 8, "rounded") < 0 ||
        check_len(&out, primes * batch * n, 8, "out") < 0 ||
        (have_small && check_len(&small, batch * n, 8, "small") < 0))
        goto done;
    if (int_tuple(primes_o, qs, MAX_PRIMES, ((uint64_t)1 << 62) - 1, "primes") < 0) goto done;
    if (PyTuple_GET_SIZE(primes_o) != primes) {
        PyErr_SetString(PyExc_ValueError, "primes and widths differ in length");
        goto done;
    }
    const double *r = rounded.buf;
    const int64_t *sm = have_small ? small.buf : NULL;
    uint64_t *o = out.buf;
    Py_ssize_t half = n / 2, first = 0;
    for (Py_ssize_t j = 0; j < primes; j++) {
        double scale[MAX_DIGITS];
        for (uint64_t k = 0; k < digits[j]; k++)
            scale[k] = (double)((u128)1 << (k * widths[j])) / (double)qs[j];
        for (Py_ssize_t b = 0; b < batch; b++) {
            uint64_t *dst = o + (j * batch + b) * n;
            for (Py_ssize_t i = 0; i < n; i++) { /* pair i/2: coefficient i/2, then i/2 + N/2 */
                Py_ssize_t at = (first * batch + b) * n + i, step = batch * n;
                uint64_t sum = 0;
                double estimate = 0.0;
                for (uint64_t k = 0; k < digits[j]; k++, at += step) {
                    sum += (uint64_t)(int64_t)r[at] << (k * widths[j]);
                    estimate += r[at] * scale[k];
                }
                Py_ssize_t coefficient = (i >> 1) + (i & 1) * half;
                if (sm) sum += (uint64_t)sm[b * n + coefficient];
                dst[coefficient] = reduce_estimated(sum, estimate, (int64_t)qs[j]);
            }
        }
        first += (Py_ssize_t)digits[j];
    }
    result = Py_None;
    Py_INCREF(result);
done:
    if (have_small && small.obj) PyBuffer_Release(&small);
    PyBuffer_Release(&rounded);
    PyBuffer_Release(&out);
    return result;
}

static PyObject *divide_and_round_q_last(PyObject *self, PyObject *args) {
    Py_buffer values, out;
    PyObject *primes_o, *inverses_o;
    Py_ssize_t count;
    if (!PyArg_ParseTuple(args, "y*OOnw*", &values, &primes_o, &inverses_o, &count, &out))
        return NULL;
    PyObject *result = NULL;
    uint64_t qs[MAX_PRIMES], inverses[MAX_PRIMES];
    uint64_t limit = ((uint64_t)1 << 62) - 1;
    if (int_tuple(primes_o, qs, MAX_PRIMES, limit, "primes") < 0) goto done;
    Py_ssize_t primes = PyTuple_GET_SIZE(primes_o);
    if (primes < 2 || !PyTuple_Check(inverses_o) || PyTuple_GET_SIZE(inverses_o) != primes - 1) {
        PyErr_SetString(PyExc_ValueError, "need two or more primes and one inverse per other");
        goto done;
    }
    if (int_tuple(inverses_o, inverses, MAX_PRIMES, limit, "inverses") < 0) goto done;
    if (count < 0 || check_len(&values, primes * count, 8, "values") < 0 ||
        check_len(&out, (primes - 1) * count, 8, "out") < 0)
        goto done;
    const uint64_t *v = values.buf, *last_row = v + (primes - 1) * count;
    uint64_t *o = out.buf;
    uint64_t last = qs[primes - 1], h = last >> 1;
    for (Py_ssize_t j = 0; j < primes - 1; j++) {
        uint64_t q = qs[j], m = UINT64_MAX / q, hq = h % q;
        uint64_t w = inverses[j], wp = (uint64_t)(((u128)w << 64) / q);
        for (Py_ssize_t i = 0; i < count; i++) {
            uint64_t shifted = last_row[i] + h;
            if (shifted >= last) shifted -= last;
            uint64_t r = barrett(shifted, q, m);
            r = r >= hq ? r - hq : r + q - hq;
            uint64_t x = v[j * count + i];
            o[j * count + i] = mulmod_shoup(x >= r ? x - r : x + q - r, w, wp, q);
        }
    }
    result = Py_None;
    Py_INCREF(result);
done:
    PyBuffer_Release(&values);
    PyBuffer_Release(&out);
    return result;
}

static PyObject *reduce_mod(PyObject *self, PyObject *args) {
    Py_buffer values;
    unsigned long long q;
    if (!PyArg_ParseTuple(args, "w*K", &values, &q)) return NULL;
    PyObject *result = NULL;
    if (q < 1) {
        PyErr_SetString(PyExc_ValueError, "modulus must be positive");
        goto done;
    }
    if (values.len % 8) {
        PyErr_SetString(PyExc_ValueError, "values: a whole number of uint64");
        goto done;
    }
    uint64_t *v = values.buf, m = UINT64_MAX / q;
    for (Py_ssize_t i = 0; i < values.len / 8; i++) v[i] = barrett(v[i], q, m);
    result = Py_None;
    Py_INCREF(result);
done:
    PyBuffer_Release(&values);
    return result;
}

static inline int popcount21(uint64_t x) { return __builtin_popcountll(x & 0x1FFFFF); }

static PyObject *centered_binomial_21(PyObject *self, PyObject *args) {
    Py_buffer stream, out;
    if (!PyArg_ParseTuple(args, "y*w*", &stream, &out)) return NULL;
    PyObject *result = NULL;
    Py_ssize_t count = out.len, triples = (count + 2) / 3;
    if (check_len(&stream, triples * 2, 8, "stream") < 0) goto done;
    const unsigned char *s = stream.buf;
    int8_t *o = out.buf;
    for (Py_ssize_t t = 0; t < triples; t++) {
        uint64_t w0, w1;
        memcpy(&w0, s + 16 * t, 8);  /* little-endian words, as SEAL's stream is read */
        memcpy(&w1, s + 16 * t + 8, 8);
        int8_t lane[3] = {
            (int8_t)(popcount21(w0) - popcount21(w0 >> 21)),
            (int8_t)(popcount21(w1) - popcount21(w1 >> 21)),
            (int8_t)(popcount21(w0 >> 42) - popcount21(w1 >> 42)),
        };
        for (int l = 0; l < 3 && 3 * t + l < count; l++) o[3 * t + l] = lane[l];
    }
    result = Py_None;
    Py_INCREF(result);
done:
    PyBuffer_Release(&stream);
    PyBuffer_Release(&out);
    return result;
}

/* (a_j * p)[k] = sum_{i <= k} a_j[i] p[k - i] - sum_{i > k} a_j[i] p[N + k - i], summed in
 * 128 bits (|p| < 2**31, a_j[i] < 2**62, N < 2**32: every sum stays below 2**125). */
static uint64_t negacyclic_coefficient(const uint64_t *a, const int32_t *p, Py_ssize_t n,
                                       Py_ssize_t k, uint64_t q) {
    i128 plus0 = 0, plus1 = 0, minus0 = 0, minus1 = 0;
    Py_ssize_t i = 0;
    for (; i + 1 <= k; i += 2) {
        plus0 += (i128)(int64_t)a[i] * p[k - i];
        plus1 += (i128)(int64_t)a[i + 1] * p[k - i - 1];
    }
    if (i <= k) plus0 += (i128)(int64_t)a[i] * p[k - i];
    for (i = k + 1; i + 1 < n; i += 2) {
        minus0 += (i128)(int64_t)a[i] * p[n + k - i];
        minus1 += (i128)(int64_t)a[i + 1] * p[n + k - i - 1];
    }
    if (i < n) minus0 += (i128)(int64_t)a[i] * p[n + k - i];
    i128 r = (plus0 + plus1 - minus0 - minus1) % (i128)q;
    return (uint64_t)(r < 0 ? r + (i128)q : r);
}

static PyObject *negacyclic_at(PyObject *self, PyObject *args) {
    Py_buffer small, values, at, which, out;
    PyObject *primes_o;
    Py_ssize_t degree;
    if (!PyArg_ParseTuple(args, "y*y*y*y*Onw*", &small, &values, &at, &which, &primes_o, &degree,
                          &out))
        return NULL;
    PyObject *result = NULL;
    uint64_t qs[MAX_PRIMES];
    if (int_tuple(primes_o, qs, MAX_PRIMES, ((uint64_t)1 << 62) - 1, "primes") < 0) goto done;
    Py_ssize_t primes = PyTuple_GET_SIZE(primes_o), count = at.len / 8;
    Py_ssize_t polys = degree > 0 ? small.len / (4 * degree) : 0;
    if (degree < 1 || degree > INT32_MAX || polys < 1 ||
        check_len(&small, polys * degree, 4, "small") < 0 ||
        check_len(&values, primes * degree, 8, "values") < 0 ||
        check_len(&at, count, 8, "coefficients") < 0 ||
        check_len(&which, count, 8, "polys") < 0 ||
        check_len(&out, primes * count, 8, "out") < 0)
        goto done;
    const int64_t *ks = at.buf, *gs = which.buf;
    for (Py_ssize_t m = 0; m < count; m++) {
        if (ks[m] < 0 || ks[m] >= degree || gs[m] < 0 || gs[m] >= polys) {
            PyErr_SetString(PyExc_ValueError, "coefficient or poly index out of range");
            goto done;
        }
    }
    const int32_t *p = small.buf;
    const uint64_t *v = values.buf;
    uint64_t *o = out.buf;
    for (Py_ssize_t j = 0; j < primes; j++)
        for (Py_ssize_t m = 0; m < count; m++)
            o[j * count + m] = negacyclic_coefficient(v + j * degree, p + gs[m] * degree, degree,
                                                      ks[m], qs[j]);
    result = Py_None;
    Py_INCREF(result);
done:
    PyBuffer_Release(&small);
    PyBuffer_Release(&values);
    PyBuffer_Release(&at);
    PyBuffer_Release(&which);
    PyBuffer_Release(&out);
    return result;
}

static PyMethodDef methods[] = {
    {"fold_digits", fold_digits, METH_VARARGS, NULL},
    {"recombine_digits", recombine_digits, METH_VARARGS, NULL},
    {"divide_and_round_q_last", divide_and_round_q_last, METH_VARARGS, NULL},
    {"reduce_mod", reduce_mod, METH_VARARGS, NULL},
    {"centered_binomial_21", centered_binomial_21, METH_VARARGS, NULL},
    {"negacyclic_at", negacyclic_at, METH_VARARGS, NULL},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "heinfer.rlwe._kernels",
    .m_doc = "Compiled loops behind heinfer.rlwe's ring, encrypt and sampling functions.",
    .m_size = -1,
    .m_methods = methods,
};

PyMODINIT_FUNC PyInit__kernels(void) {
    PyObject *m = PyModule_Create(&module);
    if (!m) return NULL;
    PyObject *names = PyList_New(0);
    for (PyMethodDef *def = methods; names && def->ml_name; def++) {
        PyObject *name = PyUnicode_FromString(def->ml_name);
        if (!name || PyList_Append(names, name) < 0) Py_CLEAR(names);
        Py_XDECREF(name);
    }
    if (!names || PyModule_AddObject(m, "__all__", names) < 0) {
        Py_XDECREF(names);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
