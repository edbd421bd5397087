/* TensorFlow's histograms of float32 tensors in one pass each, without the GIL.
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
        PyErr_Format(PyExc_ValueError, "float32_histograms: %s must have items of %zd bytes of format '%s', "
                     "got %zd bytes of format '%s'", what, itemsize, formats, view->itemsize, view->format);
        PyBuffer_Release(view);
        return -1;
    }
    return 0;
}

/* float32_histograms(arrays, cells, thresholds, stats, counts) -> int
 *
 * arrays: a list of C-contiguous float32 buffers, one a row; cells: 65536 uint16 buckets; thresholds:
 * one float32 a bucket; stats: float64, 4 a row (min, max, sum, sum of squares; zeros for an empty
 * row), written; counts: int64, one row of len(thresholds) a row, added to. Returns -1, or the first
 * row holding NaN or Inf (its counts then partial). */
static PyObject *
float32_histograms(PyObject *self, PyObject *args)
{
    (void)self;
    PyObject *arrays, *cells_obj, *thresholds_obj, *stats_obj, *counts_obj;
    if (!PyArg_ParseTuple(args, "O!OOOO", &PyList_Type, &arrays, &cells_obj, &thresholds_obj, &stats_obj,
                          &counts_obj))
        return NULL;
    Py_ssize_t rows = PyList_GET_SIZE(arrays), held = 0, width, bad = -1;
    Py_buffer cells, thresholds, stats, counts, *views = NULL;
    PyObject *result = NULL;
    if (get_buffer(cells_obj, &cells, PyBUF_SIMPLE, 2, "H", "cells") < 0)
        return NULL;
    if (get_buffer(thresholds_obj, &thresholds, PyBUF_SIMPLE, 4, "f", "thresholds") < 0)
        goto release_cells;
    if (get_buffer(stats_obj, &stats, PyBUF_WRITABLE, 8, "d", "stats") < 0)
        goto release_thresholds;
    if (get_buffer(counts_obj, &counts, PyBUF_WRITABLE, 8, "lq", "counts") < 0)
        goto release_stats;
    width = thresholds.len / 4;
    if (cells.len != 2 * 65536 || width < 1 || stats.len < 32 * rows || counts.len < 8 * width * rows) {
        PyErr_SetString(PyExc_ValueError, "float32_histograms: a table or an output has the wrong size");
        goto release_counts;
    }
    views = PyMem_Calloc(rows > 0 ? (size_t)rows : 1, sizeof(Py_buffer));
    if (views == NULL) {
        PyErr_NoMemory();
        goto release_counts;
    }
    for (; held < rows; held++) {
        if (get_buffer(PyList_GET_ITEM(arrays, held), &views[held], PyBUF_SIMPLE, 4, "f", "each array") < 0)
            goto release_views;
    }
    const uint16_t *cell = cells.buf;
    const float *threshold = thresholds.buf;
    double *stat = stats.buf;
    int64_t *count = counts.buf;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t r = 0; r < rows; r++) {
        const float *v = views[r].buf;
        Py_ssize_t n = views[r].len / 4;
        int64_t *c = count + r * width;
        double lo = 0.0, hi = 0.0, sum = 0.0, squares = 0.0;
        if (n > 0)
            lo = hi = (double)v[0];
        for (Py_ssize_t i = 0; i < n; i++) {
            float x = v[i];
            uint32_t bits;
            memcpy(&bits, &x, sizeof bits);
            Py_ssize_t b = cell[bits >> 16];
            if (b >= width)
                b = width - 1;
            b += x >= threshold[b];
            if (b >= width)  /* +inf: its row is reported below */
                b = width - 1;
            c[b]++;
            double d = (double)x;
            lo = d < lo ? d : lo;
            hi = d > hi ? d : hi;
            sum += d;
            squares += d * d;
        }
        /* A NaN or Inf makes the sum NaN or Inf; finite float32 values cannot (n * 2**128 < DBL_MAX). */
        if (!isfinite(sum) && bad < 0)
            bad = r;
        stat[4 * r] = lo;
        stat[4 * r + 1] = hi;
        stat[4 * r + 2] = sum;
        stat[4 * r + 3] = squares;
    }
    Py_END_ALLOW_THREADS
    result = PyLong_FromSsize_t(bad);
release_views:
    for (Py_ssize_t i = 0; i < held; i++)
        PyBuffer_Release(&views[i]);
    PyMem_Free(views);
release_counts:
    PyBuffer_Release(&counts);
release_stats:
    PyBuffer_Release(&stats);
release_thresholds:
    PyBuffer_Release(&thresholds);
release_cells:
    PyBuffer_Release(&cells);
    return result;
}

static PyMethodDef methods[] = {
    {"float32_histograms", float32_histograms, METH_VARARGS,
     "float32_histograms(arrays, cells, thresholds, stats, counts) -> int: TF histograms of float32 rows, "
     "without the GIL; -1, or the first row holding NaN or Inf."},
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
