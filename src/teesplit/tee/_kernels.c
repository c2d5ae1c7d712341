/* Fused float32 loops of the trusted side's attention and MLP (teesplit.tee.kernels wraps them).

numpy runs an online-softmax block as four passes over the scores (max, subtract, exp, sum),
silu(g) * u as seven, and the q|k|v row scale and RoPE as five; each pass streams the arrays
through the cache. Here each is one or two loops over GCC vectors. The matrix products stay in
numpy's BLAS.

Trusted code: only the C library and Python's buffer protocol. The Python wrapper checks every
shape, dtype and contiguity before calling; these functions check the buffers' lengths again, so
a wrong call raises ValueError instead of reading out of bounds. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
/* Compiled for AVX2 with FMA (Haswell, 2013, and later), whatever the build's own flags; the
 * bindings refuse to run them on an older x86 CPU, where tee/kernels.py uses numpy. */
#define KERNEL __attribute__((target("avx2,fma")))
#define FAST() (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
#define USABLE() FAST()
#else
/* Elsewhere (aarch64: NEON) the same code for the build's target: correct, not measured, so
 * not used by default. */
#define KERNEL
#define FAST() 0
#define USABLE() 1
#endif

/* 8 float32 lanes: one AVX2 register (16 were slower on AVX2 and barely faster on AVX-512). */
#define LANES 8
typedef float vf __attribute__((vector_size(LANES * 4)));
typedef int32_t vi __attribute__((vector_size(LANES * 4)));

static inline vf load(const float *p) {
    vf v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline void store(float *p, vf v) { memcpy(p, &v, sizeof v); }

static inline vf splat(float x) { return (vf){0} + x; }

/* where mask (all ones or zeros per lane) a, else b */
static inline vf sel(vi mask, vf a, vf b) { return (vf)(((vi)a & mask) | ((vi)b & ~mask)); }

/* exp(x) for x <= 0 (x = score - row max, -|g|), 0 below -87.3 (where the result is about to
 * be subnormal) and for NaN (the callers give NaN rows and silu NaN themselves). x = n ln2 + r
 * with |r| <= ln2 / 2 (ln2 in two parts, Cody and Waite: n ln2_hi is exact), e^r by a degree-6
 * polynomial fitted for relative error (under 2e-9 before rounding), times 2^n built in the
 * exponent bits. Within about 1 ulp of the correctly rounded exp over [-87.3, 0]
 * (tests/tee/test_kernels.py). -inf, clamped to -87.3 first, makes no subnormal intermediate
 * (slow on x86). */
static inline vf exp_nonpos(vf x) {
    vi in_range = x > -87.3f;
    vf xc = sel(in_range, x, splat(-87.3f));
    vf n = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f; /* round(x log2 e) */
    vf r = xc - n * 0.693145751953125f;
    r = r - n * 1.42860682030941723212e-6f;
    vf p = splat(0x1.6abefcp-10f);
    p = p * r + 0x1.126d16p-7f;
    p = p * r + 0x1.555892p-5f;
    p = p * r + 0x1.55540ap-3f;
    p = p * r + 0x1.fffffap-2f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    vi e = (__builtin_convertvector(n, vi) + 127) << 23; /* n in [-126, 0]: a normal 2^n */
    return (vf)((vi)(p * (vf)e) & in_range);
}

KERNEL static inline float exp1(float x) {
    float b[LANES] = {x};
    store(b, exp_nonpos(load(b)));
    return b[0];
}

/* A row's last Sk % LANES elements, padded with `fill`, as one vector (and back). */
static inline vf load_tail(const float *p, Py_ssize_t n, float fill) {
    float b[LANES];
    for (int l = 0; l < LANES; l++) b[l] = l < n ? p[l] : fill;
    return load(b);
}

static inline void store_tail(float *p, Py_ssize_t n, vf v) {
    float b[LANES];
    store(b, v);
    memcpy(p, b, n * sizeof(float));
}

/* The online-softmax step of one key block, rows = B Hkv G Tq rows of Sk scaled scores each.
 * hidden (B, Tq, Sk) bytes or NULL: nonzero marks a key the row's query may not see (-inf).
 * m: the rows' running max, in/out; total: the running sum, in/out; alpha (out): by how much the
 * caller rescales its accumulated output, exp(m_old - m_new). s is replaced by exp(s - m_new).
 * first: no block before; m_new = max(row max, lowest float), so a row that sees nothing gets
 * exp(-inf) = 0 everywhere, and alpha is not written. NaN anywhere in a row makes it NaN. */
KERNEL static void softmax_step_impl(float *s, const uint8_t *hidden, float *m, float *total,
                                     float *alpha, Py_ssize_t rows, Py_ssize_t rows_per_b,
                                     Py_ssize_t Tq, Py_ssize_t Sk, int first) {
    const Py_ssize_t full = Sk - Sk % LANES, tail = Sk % LANES;
    for (Py_ssize_t i = 0; i < rows; i++) {
        float *row = s + i * Sk;
        if (hidden != NULL) {
            const uint8_t *h = hidden + ((i / rows_per_b) * Tq + i % Tq) * Sk;
            for (Py_ssize_t j = 0; j < Sk; j++) row[j] = h[j] ? -INFINITY : row[j];
        }
        vf mx = splat(-INFINITY);
        vi nan = {0};
        for (Py_ssize_t j = 0; j < full; j += LANES) {
            vf v = load(row + j);
            mx = sel(v > mx, v, mx);
            nan |= v != v;
        }
        if (tail) {
            vf v = load_tail(row + full, tail, -INFINITY);
            mx = sel(v > mx, v, mx);
            nan |= v != v;
        }
        float mrow = -INFINITY;
        int any_nan = 0;
        for (int l = 0; l < LANES; l++) {
            mrow = mx[l] > mrow ? mx[l] : mrow;
            any_nan |= nan[l] != 0;
        }
        float m_old = m[i], m_new;
        if (any_nan)
            m_new = NAN;
        else if (first)
            m_new = mrow > -3.40282347e+38f ? mrow : -3.40282347e+38f;
        else
            m_new = m_old != m_old ? m_old : (mrow > m_old ? mrow : m_old);
        if (m_new != m_new || m_new == INFINITY) { /* NaN or +inf in: a NaN row, as in numpy */
            for (Py_ssize_t j = 0; j < Sk; j++) row[j] = NAN;
            if (!first) alpha[i] = NAN;
            total[i] = m[i] = NAN;
            continue;
        }
        vf sum = splat(0.0f);
        for (Py_ssize_t j = 0; j < full; j += LANES) {
            vf e = exp_nonpos(load(row + j) - m_new);
            store(row + j, e);
            sum += e;
        }
        if (tail) {
            vf e = exp_nonpos(load_tail(row + full, tail, -INFINITY) - m_new);
            store_tail(row + full, tail, e);
            sum += e; /* the padding's exp(-inf - m_new) is 0 */
        }
        float acc = 0.0f;
        for (int l = 0; l < LANES; l++) acc += sum[l];
        if (first) {
            total[i] = acc;
        } else {
            float a = exp1(m_old - m_new);
            alpha[i] = a;
            total[i] = total[i] * a + acc;
        }
        m[i] = m_new;
    }
}

/* out[i, :] = silu(g) * u for g = r[i] G[i, :] (+ bias[:F]), u = r[i] U[i, :] (+ bias[F:]), row i
 * of G at g + i stride, of U at u + u_offset + i stride (the merged plans' gate|up rows: one
 * buffer, stride 2F, u_offset F; separate gate and up: stride F). r or bias may be NULL.
 * silu(g) = g f / (1 + e) with e = exp(-|g|), f = 1 for g >= 0 and e below: torch's
 * g / (1 + exp(-g)) without overflow, the operations of ops.silu. */
static inline vf swiglu_v(vf g, vf u, float ri, const float *bg, const float *bu, int scaled) {
    if (scaled) g = g * ri, u = u * ri;
    if (bg != NULL) g = g + load(bg), u = u + load(bu);
    vf e = exp_nonpos(sel(g < 0.0f, g, -g));
    vf f = sel(g >= 0.0f, splat(1.0f), e);
    return ((g * f) / (e + 1.0f)) * u;
}

KERNEL static void swiglu_impl(float *out, const float *g, const float *u, const float *r,
                               const float *bias, Py_ssize_t rows, Py_ssize_t F,
                               Py_ssize_t stride, Py_ssize_t u_offset) {
    const Py_ssize_t full = F - F % LANES, tail = F % LANES;
    float bg[LANES] = {0}, bu[LANES] = {0};
    if (tail && bias != NULL) {
        memcpy(bg, bias + full, tail * sizeof(float));
        memcpy(bu, bias + F + full, tail * sizeof(float));
    }
    for (Py_ssize_t i = 0; i < rows; i++) {
        const float *gi = g + i * stride, *ui = u + u_offset + i * stride;
        float *o = out + i * F;
        float ri = r != NULL ? r[i] : 1.0f;
        for (Py_ssize_t j = 0; j < full; j += LANES)
            store(o + j, swiglu_v(load(gi + j), load(ui + j), ri, bias ? bias + j : NULL,
                                  bias ? bias + F + j : NULL, r != NULL));
        if (tail) {
            vf y = swiglu_v(load_tail(gi + full, tail, 0.0f), load_tail(ui + full, tail, 0.0f), ri,
                            bias ? bg : NULL, bias ? bu : NULL, r != NULL);
            store_tail(o + full, tail, y);
        }
    }
}

/* out[i, :] = y = r[i] z[i, :] (+ bias), its first `heads` heads of D rotated (RoPE): with
 * c = cos[i, :] and s = ssin[i, :] = [-sin1, sin2] (ops.rope_signed_sin),
 * y'[:D/2] = y1 c[:D/2] + y2 s[:D/2], y'[D/2:] = y2 c[D/2:] + y1 s[D/2:], as ops.rope_rotate;
 * the columns after them (v) only scaled. z, out (rows, W); cos, ssin (rows, D).
 * No fused multiply-adds: every product and sum rounded as numpy rounds them, so q, k and v
 * are numpy's bits (and the K/V cache the same whichever path filled it). */
#if defined(__clang__)
#define NO_CONTRACT
#else
#define NO_CONTRACT __attribute__((optimize("fp-contract=off")))
#endif
KERNEL NO_CONTRACT static void rope_qkv_impl(float *out, const float *z, const float *r, const float *bias,
                                 const float *cos, const float *ssin, Py_ssize_t rows,
                                 Py_ssize_t W, Py_ssize_t heads, Py_ssize_t D) {
#if defined(__clang__)
#pragma clang fp contract(off)
#endif
    const Py_ssize_t half = D / 2, full = half - half % LANES, tail = half % LANES;
    for (Py_ssize_t i = 0; i < rows; i++) {
        const float *zi = z + i * W, *ci = cos + i * D, *si = ssin + i * D;
        float *oi = out + i * W;
        const float ri = r != NULL ? r[i] : 1.0f;
        for (Py_ssize_t h = 0; h < heads; h++) {
            for (Py_ssize_t j = 0; j < half; j += LANES) {
                Py_ssize_t n = j < full ? LANES : tail, a = h * D + j, b = a + half;
                vf y1 = n == LANES ? load(zi + a) : load_tail(zi + a, n, 0.0f);
                vf y2 = n == LANES ? load(zi + b) : load_tail(zi + b, n, 0.0f);
                if (r != NULL) y1 = y1 * ri, y2 = y2 * ri;
                if (bias != NULL) {
                    y1 += n == LANES ? load(bias + a) : load_tail(bias + a, n, 0.0f);
                    y2 += n == LANES ? load(bias + b) : load_tail(bias + b, n, 0.0f);
                }
                vf c1 = n == LANES ? load(ci + j) : load_tail(ci + j, n, 0.0f);
                vf c2 = n == LANES ? load(ci + j + half) : load_tail(ci + j + half, n, 0.0f);
                vf s1 = n == LANES ? load(si + j) : load_tail(si + j, n, 0.0f);
                vf s2 = n == LANES ? load(si + j + half) : load_tail(si + j + half, n, 0.0f);
                vf o1 = y1 * c1 + y2 * s1, o2 = y2 * c2 + y1 * s2;
                if (n == LANES) {
                    store(oi + a, o1);
                    store(oi + b, o2);
                } else {
                    store_tail(oi + a, n, o1);
                    store_tail(oi + b, n, o2);
                }
            }
        }
        for (Py_ssize_t j = heads * D; j < W; j++) {
            float y = r != NULL ? zi[j] * ri : zi[j];
            oi[j] = bias != NULL ? y + bias[j] : y;
        }
    }
}

/* ---- Python bindings ------------------------------------------------------------------------ */

static int check_usable(void) {
    if (USABLE()) return 0;
    PyErr_SetString(PyExc_RuntimeError, "teesplit.tee._kernels needs a CPU with AVX2 and FMA");
    return -1;
}


static int check_len(const Py_buffer *b, Py_ssize_t n, size_t item, const char *name) {
    if (b->len != n * (Py_ssize_t)item) {
        PyErr_Format(PyExc_ValueError, "%s: %zd bytes, expected %zd", name, b->len,
                     n * (Py_ssize_t)item);
        return -1;
    }
    return 0;
}

static PyObject *softmax_step(PyObject *self, PyObject *args) {
    Py_buffer s, m, total, alpha, hidden = {0};
    PyObject *hidden_obj;
    Py_ssize_t rows, rows_per_b, Tq, Sk;
    int first;
    if (check_usable() || !PyArg_ParseTuple(args, "w*Ow*w*w*nnnnp", &s, &hidden_obj, &m, &total, &alpha, &rows,
                          &rows_per_b, &Tq, &Sk, &first))
        return NULL;
    PyObject *result = NULL;
    int have_hidden = hidden_obj != Py_None;
    if (have_hidden && PyObject_GetBuffer(hidden_obj, &hidden, PyBUF_C_CONTIGUOUS) < 0) goto done;
    if (rows < 0 || Sk < 0 || Tq <= 0 || rows_per_b <= 0 || rows_per_b % Tq || rows % rows_per_b) {
        PyErr_SetString(PyExc_ValueError, "softmax_step: inconsistent shape");
        goto done;
    }
    if (check_len(&s, rows * Sk, sizeof(float), "s") || check_len(&m, rows, sizeof(float), "m") ||
        check_len(&total, rows, sizeof(float), "total") ||
        check_len(&alpha, rows, sizeof(float), "alpha") ||
        (have_hidden && check_len(&hidden, rows / rows_per_b * Tq * Sk, 1, "hidden")))
        goto done;
    Py_BEGIN_ALLOW_THREADS
    softmax_step_impl((float *)s.buf, have_hidden ? (const uint8_t *)hidden.buf : NULL,
                      (float *)m.buf, (float *)total.buf, (float *)alpha.buf, rows, rows_per_b,
                      Tq, Sk, first);
    Py_END_ALLOW_THREADS
    result = Py_NewRef(Py_None);
done:
    PyBuffer_Release(&s);
    PyBuffer_Release(&m);
    PyBuffer_Release(&total);
    PyBuffer_Release(&alpha);
    if (have_hidden && hidden.obj != NULL) PyBuffer_Release(&hidden);
    return result;
}

static PyObject *swiglu(PyObject *self, PyObject *args) {
    Py_buffer out, g, u, r = {0}, bias = {0};
    PyObject *r_obj, *bias_obj;
    Py_ssize_t rows, F, stride, u_offset;
    if (check_usable() || !PyArg_ParseTuple(args, "w*y*y*OOnnnn", &out, &g, &u, &r_obj, &bias_obj,
                                            &rows, &F, &stride, &u_offset))
        return NULL;
    PyObject *result = NULL;
    int have_r = r_obj != Py_None, have_bias = bias_obj != Py_None;
    if (have_r && PyObject_GetBuffer(r_obj, &r, PyBUF_C_CONTIGUOUS) < 0) goto done;
    if (have_bias && PyObject_GetBuffer(bias_obj, &bias, PyBUF_C_CONTIGUOUS) < 0) goto done;
    if (rows < 0 || F < 0 || u_offset < 0 || F > stride || u_offset + F > stride) {
        PyErr_SetString(PyExc_ValueError, "swiglu: inconsistent shape");
        goto done;
    }
    if (check_len(&out, rows * F, sizeof(float), "out") ||
        check_len(&g, rows * stride, sizeof(float), "g") ||
        check_len(&u, rows * stride, sizeof(float), "u") ||
        (have_r && check_len(&r, rows, sizeof(float), "r")) ||
        (have_bias && check_len(&bias, 2 * F, sizeof(float), "bias")))
        goto done;
    Py_BEGIN_ALLOW_THREADS
    swiglu_impl((float *)out.buf, (const float *)g.buf, (const float *)u.buf,
                have_r ? (const float *)r.buf : NULL, have_bias ? (const float *)bias.buf : NULL,
                rows, F, stride, u_offset);
    Py_END_ALLOW_THREADS
    result = Py_NewRef(Py_None);
done:
    PyBuffer_Release(&out);
    PyBuffer_Release(&g);
    PyBuffer_Release(&u);
    if (have_r && r.obj != NULL) PyBuffer_Release(&r);
    if (have_bias && bias.obj != NULL) PyBuffer_Release(&bias);
    return result;
}

static PyObject *rope_qkv(PyObject *self, PyObject *args) {
    Py_buffer out, z, cos, ssin, r = {0}, bias = {0};
    PyObject *r_obj, *bias_obj;
    Py_ssize_t rows, W, heads, D;
    if (check_usable() || !PyArg_ParseTuple(args, "w*y*OOy*y*nnnn", &out, &z, &r_obj, &bias_obj,
                                            &cos, &ssin, &rows, &W, &heads, &D))
        return NULL;
    PyObject *result = NULL;
    int have_r = r_obj != Py_None, have_bias = bias_obj != Py_None;
    if (have_r && PyObject_GetBuffer(r_obj, &r, PyBUF_C_CONTIGUOUS) < 0) goto done;
    if (have_bias && PyObject_GetBuffer(bias_obj, &bias, PyBUF_C_CONTIGUOUS) < 0) goto done;
    if (rows < 0 || D <= 0 || D % 2 || heads < 0 || heads * D > W) {
        PyErr_SetString(PyExc_ValueError, "rope_qkv: inconsistent shape");
        goto done;
    }
    if (check_len(&out, rows * W, sizeof(float), "out") ||
        check_len(&z, rows * W, sizeof(float), "z") ||
        check_len(&cos, rows * D, sizeof(float), "cos") ||
        check_len(&ssin, rows * D, sizeof(float), "ssin") ||
        (have_r && check_len(&r, rows, sizeof(float), "r")) ||
        (have_bias && check_len(&bias, W, sizeof(float), "bias")))
        goto done;
    Py_BEGIN_ALLOW_THREADS
    rope_qkv_impl((float *)out.buf, (const float *)z.buf, have_r ? (const float *)r.buf : NULL,
                  have_bias ? (const float *)bias.buf : NULL, (const float *)cos.buf,
                  (const float *)ssin.buf, rows, W, heads, D);
    Py_END_ALLOW_THREADS
    result = Py_NewRef(Py_None);
done:
    PyBuffer_Release(&out);
    PyBuffer_Release(&z);
    PyBuffer_Release(&cos);
    PyBuffer_Release(&ssin);
    if (have_r && r.obj != NULL) PyBuffer_Release(&r);
    if (have_bias && bias.obj != NULL) PyBuffer_Release(&bias);
    return result;
}

KERNEL static void exp_impl(float *x, Py_ssize_t n) {
    Py_ssize_t j = 0;
    for (; j + LANES <= n; j += LANES) store(x + j, exp_nonpos(load(x + j)));
    if (j < n) store_tail(x + j, n - j, exp_nonpos(load_tail(x + j, n - j, 0.0f)));
}

static PyObject *exp_nonpos_py(PyObject *self, PyObject *args) {
    Py_buffer x;
    if (check_usable() || !PyArg_ParseTuple(args, "w*", &x)) return NULL;
    exp_impl((float *)x.buf, x.len / (Py_ssize_t)sizeof(float));
    PyBuffer_Release(&x);
    Py_RETURN_NONE;
}

static PyObject *vectorized(PyObject *self, PyObject *args) { return PyBool_FromLong(FAST()); }

static PyMethodDef methods[] = {
    {"softmax_step", softmax_step, METH_VARARGS,
     "softmax_step(s, hidden, m, total, alpha, rows, rows_per_b, Tq, Sk, first)"},
    {"swiglu", swiglu, METH_VARARGS, "swiglu(out, g, u, r, bias, rows, F, stride, u_offset)"},
    {"rope_qkv", rope_qkv, METH_VARARGS,
     "rope_qkv(out, z, r, bias, cos, ssin, rows, W, heads, D)"},
    {"exp_nonpos", exp_nonpos_py, METH_VARARGS, "exp_nonpos(x): x = exp(x) in place (x <= 0)"},
    {"vectorized", vectorized, METH_NOARGS, "whether this CPU runs the AVX2 build of the loops"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_kernels", NULL, -1, methods,
                                    NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__kernels(void) { return PyModule_Create(&module); }
