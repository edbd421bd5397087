/* TensorFlow's histograms of float32 tensors in one pass each, without the GIL; and the copy of a
 * summary write's float32 values on the training thread (gather_float32, at the end).
 *
 * torchslim.event_file computes the same with numpy: fourteen passes over a group's values, each a
 * numpy call that hands the GIL over and back, which beside a training loop cost it more than the
 * writer thread's other work together (event_file._group_protos says how much). This loop does one
 * pass a tensor and holds no GIL: min, max, sum and sum of squares in double (summed in order, as
 * TF's Histogram::Add sums them), and each value's bucket from the top 16 bits of its pattern
 * (cells[bits >> 16]) plus one compare with that bucket's float32 threshold. The tables are
 * event_file's; it builds and checks them.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

/* A C-contiguous buffer of items of `itemsize` bytes whose struct format is one of `formats`. */
static int
get_buffer(PyObject *obj, Py_buffer *view, int flags, Py_ssize_t itemsize, const char *formats, const char *what)
{
    if (PyObject_GetBuffer(obj, view, flags | PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) < 0)
        return -1;
    const char *format = view->format != NULL ? view->format : "B";
    if (*format == '@' || *format == '=')
        format++;
    if (view->itemsize != itemsize || strlen(format) != 1 || strchr(formats, *format) == NULL) {
        PyErr_Format(PyExc_ValueError, "float32_histogram_protos: %s must have items of %zd bytes of format '%s', "
                     "got %zd bytes of format '%s'", what, itemsize, formats, view->itemsize, view->format);
        PyBuffer_Release(view);
        return -1;
    }
    return 0;
}

/* A PyArg converter: a Python int to the address it holds. */
static int
address_of(PyObject *obj, void *out)
{
    void *address = PyLong_AsVoidPtr(obj);
    if (address == NULL && PyErr_Occurred())
        return 0;
    *(void **)out = address;
    return 1;
}

/* Little-endian bytes, as protobuf stores them, whatever the host's order. */
static inline unsigned char *
put_double(unsigned char *p, double d)
{
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
    memcpy(p, &d, sizeof d);
#else
    uint64_t u;
    memcpy(&u, &d, sizeof u);
    for (int i = 0; i < 8; i++)
        p[i] = (unsigned char)(u >> (8 * i));
#endif
    return p + 8;
}

static inline unsigned char *
put_varint(unsigned char *p, uint64_t n)
{
    while (n >= 0x80) {
        *p++ = (unsigned char)(n | 0x80);
        n >>= 7;
    }
    *p++ = (unsigned char)n;
    return p;
}

/* The bucket of x: its cell's, or the next where x reaches that bucket's threshold (+inf: the last). */
static inline Py_ssize_t
bucket_of(float x, const uint16_t *cell, const float *threshold, Py_ssize_t width)
{
    uint32_t bits;
    memcpy(&bits, &x, sizeof bits);
    Py_ssize_t b = cell[bits >> 16];
    if (b >= width)
        b = width - 1;
    b += x >= threshold[b];
    return b < width ? b : width - 1;
}

/* The most bytes a HistogramProto with `kept` buckets takes: five keyed doubles, two packed fields. */
#define PROTO_BYTES(kept) (5 * 9 + 2 * (1 + 10) + 16 * (size_t)(kept))

/* float32_histogram_protos(arrays, cells, thresholds, limits) -> list[bytes] | int
 *
 * arrays: a list of C-contiguous float32 buffers, or of (address, count) of float32 values that stay
 * alive and unchanged for the call (summary_records passes a CPU tensor's this way); cells: 65536 uint16 buckets; thresholds: one float32
 * a bucket; limits: one float64 a bucket (its right limit). Returns each array's serialized
 * HistogramProto, as event_file._protos makes it from numpy's counts (min, max, num, sum, sum_squares,
 * zeros left out; then the kept buckets' limits and counts as packed doubles), or, where an array holds
 * NaN or Inf, the index of the first such array. */
static PyObject *
float32_histogram_protos(PyObject *self, PyObject *args)
{
    (void)self;
    PyObject *arrays, *cells_obj, *thresholds_obj, *limits_obj;
    if (!PyArg_ParseTuple(args, "O!OOO", &PyList_Type, &arrays, &cells_obj, &thresholds_obj, &limits_obj))
        return NULL;
    Py_ssize_t rows = PyList_GET_SIZE(arrays), held = 0, width, bad = -1;
    Py_buffer cells, thresholds, limits, *views = NULL;
    PyObject *result = NULL;
    int64_t *count = NULL;
    Py_ssize_t *keep = NULL;
    size_t *ends = NULL, capacity = 0, used = 0;
    unsigned char *out = NULL;
    int out_of_memory = 0;
    if (get_buffer(cells_obj, &cells, PyBUF_SIMPLE, 2, "H", "cells") < 0)
        return NULL;
    if (get_buffer(thresholds_obj, &thresholds, PyBUF_SIMPLE, 4, "f", "thresholds") < 0)
        goto release_cells;
    if (get_buffer(limits_obj, &limits, PyBUF_SIMPLE, 8, "d", "limits") < 0)
        goto release_thresholds;
    width = thresholds.len / 4;
    if (cells.len != 2 * 65536 || width < 1 || limits.len != 8 * width) {
        PyErr_SetString(PyExc_ValueError, "float32_histogram_protos: a table has the wrong size");
        goto release_limits;
    }
    views = PyMem_Calloc(rows > 0 ? (size_t)rows : 1, sizeof(Py_buffer));
    ends = PyMem_Calloc(rows > 0 ? (size_t)rows : 1, sizeof(size_t));
    count = PyMem_Calloc((size_t)width, sizeof(int64_t));
    keep = PyMem_Calloc((size_t)width, sizeof(Py_ssize_t));
    if (views == NULL || ends == NULL || count == NULL || keep == NULL) {
        PyErr_NoMemory();
        goto release_views;
    }
    for (; held < rows; held++) {
        PyObject *array = PyList_GET_ITEM(arrays, held);
        if (PyTuple_Check(array)) {  /* (address, count): a live tensor's float32 storage, held by the caller */
            void *address;
            Py_ssize_t n;
            if (!PyArg_ParseTuple(array, "O&n", address_of, &address, &n))
                goto release_views;
            if (n < 0 || (n > 0 && address == NULL)) {
                PyErr_SetString(PyExc_ValueError, "float32_histogram_protos: an (address, count) is not valid");
                goto release_views;
            }
            views[held].buf = address;
            views[held].len = 4 * n;
        } else if (get_buffer(array, &views[held], PyBUF_SIMPLE, 4, "f", "each array") < 0) {
            goto release_views;
        }
    }
    const uint16_t *cell = cells.buf;
    const float *threshold = thresholds.buf;
    const double *limit = limits.buf;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t r = 0; r < rows; r++) {
        const float *v = views[r].buf;
        Py_ssize_t n = views[r].len / 4, first = 0, last = -1;
        double lo = 0.0, hi = 0.0, sum = 0.0, squares = 0.0;
        if (n > 0)
            lo = hi = (double)v[0];
        for (Py_ssize_t i = 0; i < n; i++) {
            float x = v[i];
            count[bucket_of(x, cell, threshold, width)]++;
            double d = (double)x;
            lo = d < lo ? d : lo;
            hi = d > hi ? d : hi;
            sum += d;
            squares += d * d;
        }
        /* A NaN or Inf makes the sum NaN or Inf; finite float32 values cannot (n * 2**128 < DBL_MAX). */
        if (!isfinite(sum)) {
            bad = r;
            break;
        }
        if (n == 0) {  /* TF's empty histogram */
            lo = limit[width - 1];
            hi = -limit[width - 1];
        } else {  /* the buckets of the least and the greatest value, which the loop counted in */
            first = bucket_of((float)lo, cell, threshold, width);
            last = bucket_of((float)hi, cell, threshold, width);
        }
        /* Kept: the nonempty buckets, and of each run of empty ones between two nonempty its last. */
        size_t kept = 0;
        for (Py_ssize_t b = first; b <= last; b++) {
            if (count[b] > 0) {
                if (b > first && count[b - 1] == 0)
                    keep[kept++] = b - 1;
                keep[kept++] = b;
            }
        }
        if (used + PROTO_BYTES(kept) > capacity) {
            size_t want = 2 * capacity > used + PROTO_BYTES(kept) ? 2 * capacity : used + PROTO_BYTES(kept);
            unsigned char *grown = realloc(out, want);
            if (grown == NULL) {
                out_of_memory = 1;
                break;
            }
            out = grown;
            capacity = want;
        }
        unsigned char *p = out + used;
        const double head[5] = {lo, hi, (double)n, sum, squares};
        for (int f = 0; f < 5; f++) {
            if (head[f] != 0.0 || signbit(head[f])) {  /* zeros are left out, as protobuf leaves them (not -0.0) */
                *p++ = (unsigned char)(((f + 1) << 3) | 1);
                p = put_double(p, head[f]);
            }
        }
        if (kept > 0) {
            *p++ = 0x32;
            p = put_varint(p, 8 * kept);
            for (size_t k = 0; k < kept; k++)
                p = put_double(p, limit[keep[k]]);
            *p++ = 0x3a;
            p = put_varint(p, 8 * kept);
            for (size_t k = 0; k < kept; k++)
                p = put_double(p, (double)count[keep[k]]);
            memset(count + first, 0, (size_t)(last - first + 1) * sizeof(int64_t));
        }
        used = (size_t)(p - out);
        ends[r] = used;
    }
    Py_END_ALLOW_THREADS
    if (out_of_memory) {
        PyErr_NoMemory();
    } else if (bad >= 0) {
        result = PyLong_FromSsize_t(bad);
    } else if ((result = PyList_New(rows)) != NULL) {
        for (Py_ssize_t r = 0; r < rows; r++) {
            size_t start = r > 0 ? ends[r - 1] : 0;
            PyObject *proto = PyBytes_FromStringAndSize((const char *)out + start, (Py_ssize_t)(ends[r] - start));
            if (proto == NULL) {
                Py_CLEAR(result);
                break;
            }
            PyList_SET_ITEM(result, r, proto);
        }
    }
release_views:
    for (Py_ssize_t i = 0; i < held; i++)
        PyBuffer_Release(&views[i]);
    PyMem_Free(views);
    PyMem_Free(ends);
    PyMem_Free(count);
    PyMem_Free(keep);
    free(out);
release_limits:
    PyBuffer_Release(&limits);
release_thresholds:
    PyBuffer_Release(&thresholds);
release_cells:
    PyBuffer_Release(&cells);
    return result;
}

static void
copy_all(float *to, const float **from, const Py_ssize_t *counts, Py_ssize_t rows)
{
    for (Py_ssize_t r = 0; r < rows; r++) {
        memcpy(to, from[r], (size_t)counts[r] * sizeof(float));
        to += counts[r];
    }
}

/* gather_float32(destination, capacity, sources) -> int
 *
 * Copies each source's float32 values, one after another, to `destination` (the address of `capacity`
 * float32 values); each source an (address, count) of a live C-contiguous CPU tensor's values, held by
 * the caller for the call. Returns the count copied. summary_records' snapshot of a write: one call in
 * place of a reshape view a tensor and a torch.cat, which cost the training thread 1-2 us a tensor. The
 * GIL is kept for small copies: handing it over beside the writer thread costs more than the copy. */
static PyObject *
gather_float32(PyObject *self, PyObject *args)
{
    (void)self;
    void *destination;
    Py_ssize_t capacity, total = 0;
    PyObject *sources;
    if (!PyArg_ParseTuple(args, "O&nO!", address_of, &destination, &capacity, &PyList_Type, &sources))
        return NULL;
    Py_ssize_t rows = PyList_GET_SIZE(sources);
    const float **from = PyMem_Calloc(rows > 0 ? (size_t)rows : 1, sizeof(float *));
    Py_ssize_t *counts = PyMem_Calloc(rows > 0 ? (size_t)rows : 1, sizeof(Py_ssize_t));
    if (from == NULL || counts == NULL) {
        PyMem_Free(from);
        PyMem_Free(counts);
        return PyErr_NoMemory();
    }
    for (Py_ssize_t r = 0; r < rows; r++) {
        PyObject *source = PyList_GET_ITEM(sources, r);
        void *address;
        if (!PyTuple_Check(source) || !PyArg_ParseTuple(source, "O&n", address_of, &address, &counts[r])) {
            if (!PyErr_Occurred())
                PyErr_SetString(PyExc_TypeError, "gather_float32: each source must be an (address, count) tuple");
            goto fail;
        }
        if (counts[r] < 0 || (counts[r] > 0 && address == NULL) || counts[r] > capacity - total) {
            PyErr_Format(PyExc_ValueError, "gather_float32: source %zd (count %zd) is not valid or does not fit "
                         "in the %zd values left of the destination", r, counts[r], capacity - total);
            goto fail;
        }
        from[r] = address;
        total += counts[r];
    }
    if (total > 0 && destination == NULL) {
        PyErr_SetString(PyExc_ValueError, "gather_float32: the destination address is 0");
        goto fail;
    }
    if (total >= (1 << 18)) {  /* 1 MB and more: the copy outlasts a GIL hand-over */
        Py_BEGIN_ALLOW_THREADS
        copy_all(destination, from, counts, rows);
        Py_END_ALLOW_THREADS
    } else {
        copy_all(destination, from, counts, rows);
    }
    PyMem_Free(from);
    PyMem_Free(counts);
    return PyLong_FromSsize_t(total);
fail:
    PyMem_Free(from);
    PyMem_Free(counts);
    return NULL;
}

static PyMethodDef methods[] = {
    {"gather_float32", gather_float32, METH_VARARGS,
     "gather_float32(destination, capacity, sources) -> int: copies each (address, count) source's float32 "
     "values one after another to the destination address, which holds capacity values."},
    {"float32_histogram_protos", float32_histogram_protos, METH_VARARGS,
     "float32_histogram_protos(arrays, cells, thresholds, limits) -> list[bytes] | int: TF's serialized "
     "HistogramProto of each float32 array, made without the GIL; or the first array holding NaN or Inf."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "torchslim._histograms", NULL, -1, methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC
PyInit__histograms(void)
{
    return PyModule_Create(&module);
}
