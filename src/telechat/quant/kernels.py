"""A native CPU matmul for few rows (decode) against int4/int8 codes, built once with the C compiler.

Why our own: on CPUs without AVX-512, torch's packed kernels (`_weight_int4pack_mm_for_cpu`,
`_weight_int8pack_mm`) are no faster than the fp32 matrix-vector product they replace (measured
in benchmarks/quant_bench.py). This kernel streams the codes once and sums in integers:

    y[m, n] = sum_g s[n, g] * (sum_{k in g} x[m, k] q[n, k] - z[n, g] * sum_{k in g} x[m, k])

with x rounded to int16 per block of up to 256 columns (error <= 1/65534 of the block's largest
|x|: far below fp16/bf16 activations; the tests hold it to the fp32 dequantized reference).

Layout ("rows"): codes uint8 [N, K] (8-bit) or [N, K/2] (4-bit, low nibble = even column),
scales fp16 [N, G], zero points uint8 [N, G], columns in group order. The source is compiled with
`cc -O3 -march=native -fopenmp` into $TELECHAT_HOME/kernels (AVX2+FMA code where the CPU has
it, portable C otherwise). Without a compiler, `available()` is False and layers use the
dequantize-then-matmul path.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import warnings

import torch
from torch import Tensor

import torch.nn.functional as F

_SOURCE = r"""
#include <math.h>
#include <stdint.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define TELECHAT_AVX2 1
#include <immintrin.h>
#endif

#define R 4  /* output rows per step: they share the loads of x and give independent sums */

static float half_to_float(uint16_t h) {
#ifdef TELECHAT_AVX2
    return _cvtsh_ss(h);
#else
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 31, man = h & 1023, bits;
    if (exp == 0 && man == 0) bits = sign;
    else if (exp == 0) {  /* subnormal */
        exp = 113;
        while (!(man & 1024)) { man <<= 1; exp--; }
        bits = sign | (exp << 23) | ((man & 1023) << 13);
    } else if (exp == 31) bits = sign | 0x7f800000 | (man << 13);
    else bits = sign | ((exp + 112) << 23) | (man << 13);
    float f;
    memcpy(&f, &bits, 4);
    return f;
#endif
}

#ifdef TELECHAT_AVX2
static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
#endif

#ifdef TELECHAT_AVX2
#ifndef AHEAD
#define AHEAD 1024
#endif
/* acc += the 8-lane int32 dot products of 16 codes (bytes at p) with 16 int16 activations; 4-bit:
   each byte holds columns 2j (low nibble) and 2j+1, e/o are the even/odd activations. */
static inline __m256i dot4(__m256i acc, const uint8_t *p, __m256i e, __m256i o) {
    _mm_prefetch((const char *)(p + AHEAD), _MM_HINT_T0);
    const __m128i m4 = _mm_set1_epi8(15), v = _mm_loadu_si128((const __m128i *)p);
    const __m256i lo = _mm256_cvtepu8_epi16(_mm_and_si128(v, m4));
    const __m256i hi = _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(v, 4), m4));
    return _mm256_add_epi32(acc, _mm256_add_epi32(_mm256_madd_epi16(lo, e), _mm256_madd_epi16(hi, o)));
}
static inline __m256i dot8(__m256i acc, const uint8_t *p, __m256i x) {
    _mm_prefetch((const char *)(p + AHEAD), _MM_HINT_T0);
    return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)p)), x));
}
/* Four rows' 8-lane sums reduced to one sum per row. */
static inline __m128i reduce4(__m256i a0, __m256i a1, __m256i a2, __m256i a3) {
    const __m256i h = _mm256_hadd_epi32(_mm256_hadd_epi32(a0, a1), _mm256_hadd_epi32(a2, a3));
    return _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1));
}

/* R = 4 output rows n..n+3 for one row of x: sum over groups g of
   s[g] * (sum over blocks b of g of sx[b] * (xq_b . q_b) - z[g] * xsum[g]).
   The four rows travel together as the lanes of one vector: a block ends in a few vector operations. */
static void rows(const int16_t *xq, const float *sx, const float *xsum, const uint8_t *q, size_t stride,
                 const uint16_t *s, const uint8_t *z, int G, int gs, int B, int bits, int K, float *y) {
    const int nb = gs / B;
    const uint8_t *q0 = q, *q1 = q + stride, *q2 = q + 2 * stride, *q3 = q + 3 * stride;
    __m128 total = _mm_setzero_ps(), zterm = _mm_setzero_ps();
    for (int g = 0; g < G; g++) {
        const __m128 sw = _mm_cvtph_ps(_mm_setr_epi16((short)s[g], (short)s[G + g], (short)s[2 * G + g],
                                                      (short)s[3 * G + g], 0, 0, 0, 0));
        const __m128 zw = _mm_cvtepi32_ps(_mm_setr_epi32(z[g], z[G + g], z[2 * G + g], z[3 * G + g]));
        zterm = _mm_fmadd_ps(_mm_mul_ps(sw, zw), _mm_set1_ps(xsum[g]), zterm);
        for (int b = 0; b < nb; b++) {
            const size_t col = (size_t)g * gs + (size_t)b * B;  /* first column of the block */
            __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, a3 = a0;
            if (bits == 4) {
                const int16_t *xe = xq + col / 2, *xo = xq + K / 2 + col / 2;
                const size_t c = col / 2;
                for (int j = 0; j < B / 2; j += 16) {
                    const __m256i e = _mm256_loadu_si256((const __m256i *)(xe + j));
                    const __m256i o = _mm256_loadu_si256((const __m256i *)(xo + j));
                    a0 = dot4(a0, q0 + c + j, e, o);
                    a1 = dot4(a1, q1 + c + j, e, o);
                    a2 = dot4(a2, q2 + c + j, e, o);
                    a3 = dot4(a3, q3 + c + j, e, o);
                }
            } else {
                for (int j = 0; j < B; j += 16) {
                    const __m256i x = _mm256_loadu_si256((const __m256i *)(xq + col + j));
                    a0 = dot8(a0, q0 + col + j, x);
                    a1 = dot8(a1, q1 + col + j, x);
                    a2 = dot8(a2, q2 + col + j, x);
                    a3 = dot8(a3, q3 + col + j, x);
                }
            }
            total = _mm_fmadd_ps(_mm_cvtepi32_ps(reduce4(a0, a1, a2, a3)), _mm_mul_ps(sw, _mm_set1_ps(sx[g * nb + b])),
                                 total);
        }
    }
    _mm_storeu_ps(y, _mm_sub_ps(total, zterm));
}
#else
/* Portable C: the same sums, one row at a time. */
static void rows(const int16_t *xq, const float *sx, const float *xsum, const uint8_t *q, size_t stride,
                 const uint16_t *s, const uint8_t *z, int G, int gs, int B, int bits, int K, float *y) {
    const int nb = gs / B;
    for (int r = 0; r < R; r++) {
        const uint8_t *qr = q + r * stride;
        float total = 0.f, zterm = 0.f;
        for (int g = 0; g < G; g++) {
            const float sw = half_to_float(s[(size_t)r * G + g]);
            zterm += sw * (float)z[(size_t)r * G + g] * xsum[g];
            for (int b = 0; b < nb; b++) {
                const size_t col = (size_t)g * gs + (size_t)b * B;
                int32_t acc = 0;
                if (bits == 4)
                    for (size_t j = col / 2; j < (col + B) / 2; j++)
                        acc += (qr[j] & 15) * (int32_t)xq[j] + (qr[j] >> 4) * (int32_t)xq[K / 2 + j];
                else
                    for (size_t j = col; j < col + B; j++) acc += qr[j] * (int32_t)xq[j];
                total += (float)acc * sx[g * nb + b] * sw;
            }
        }
        y[r] = total - zterm;
    }
}
#endif

/* y [M, N] = x [M, K] (fp32) times the dequantized codes q (rows layout), plus bias [N] when given;
   0 on success, -1 when out of memory. x is rounded to int16 per block of B columns (B: the largest power of two <= 256
   dividing gs), which keeps the integer sums exact and far from overflow. */
int telechat_qmm(const float *x, const uint8_t *q, const uint16_t *s, const uint8_t *z, const float *bias,
                 float *y, int M, int N, int K, int gs, int bits, int threads) {
    const int G = K / gs;
    int B = gs & -gs;
    if (B > 256) B = 256;
    const int nb = gs / B;
    float *xsum = malloc(sizeof(float) * (size_t)M * G), *sx = malloc(sizeof(float) * (size_t)M * G * nb);
    int16_t *xq = malloc(sizeof(int16_t) * (size_t)M * K);
    if (!xsum || !sx || !xq) { free(xsum); free(sx); free(xq); return -1; }
    for (int m = 0; m < M; m++) {
        const float *xm = x + (size_t)m * K;
        for (int g = 0; g < G; g++) {
            float t = 0.f;
            for (int j = 0; j < gs; j++) t += xm[(size_t)g * gs + j];
            xsum[(size_t)m * G + g] = t;
        }
        for (int c = 0; c < G * nb; c++) {
            float amax = 0.f;
            for (int j = 0; j < B; j++) amax = fmaxf(amax, fabsf(xm[(size_t)c * B + j]));
            const float inv = amax > 0.f ? 32767.f / amax : 0.f;
            sx[(size_t)m * G * nb + c] = amax / 32767.f;
            for (int j = 0; j < B; j++) {
                const int k = c * B + j;
                const int16_t v = (int16_t)lrintf(xm[k] * inv);
                if (bits == 4) xq[(size_t)m * K + (k & 1) * (K / 2) + k / 2] = v;  /* evens, then odds */
                else xq[(size_t)m * K + k] = v;
            }
        }
    }
    const size_t stride = bits == 4 ? (size_t)K / 2 : (size_t)K;
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int n = 0; n < N; n += R)
        for (int m = 0; m < M; m++)
            rows(xq + (size_t)m * K, sx + (size_t)m * G * nb, xsum + (size_t)m * G, q + (size_t)n * stride, stride,
                 s + (size_t)n * G, z + (size_t)n * G, G, gs, B, bits, K, y + (size_t)m * N + n);
    if (bias)
        for (int m = 0; m < M; m++)
            for (int n = 0; n < N; n++) y[(size_t)m * N + n] += bias[n];
    free(xsum); free(sx); free(xq);
    return 0;
}

/* y [M, N] = x [M, K] (fp32) times w [N, K] held as 16-bit floats (bf16 != 0: bfloat16, else IEEE
   half), in fp32 arithmetic (16-bit values are exact in fp32), plus bias [N] when given. Weights of
   a large embedding-tied lm_head stay 16-bit this way and are read once, on every core. */
static inline float bf16_to_float(uint16_t h) {
    uint32_t b = (uint32_t)h << 16;
    float f;
    memcpy(&f, &b, 4);
    return f;
}
static inline float h_to_float(uint16_t h, int bf16) { return bf16 ? bf16_to_float(h) : half_to_float(h); }

#ifdef TELECHAT_AVX2
static inline __m256 load8(const uint16_t *p, int bf16) {
    const __m128i v = _mm_loadu_si128((const __m128i *)p);
    return bf16 ? _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(v), 16)) : _mm256_cvtph_ps(v);
}
#endif

static inline __attribute__((always_inline)) void hrows(const float *x, const uint16_t *w, int K, int rr, int bf16,
                                                        float *y) {
    int k = 0;
    float acc[R] = {0};
#ifdef TELECHAT_AVX2
    if (rr == R) {
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        for (; k + 8 <= K; k += 8) {
            const __m256 xv = _mm256_loadu_ps(x + k);
            a0 = _mm256_fmadd_ps(load8(w + k, bf16), xv, a0);
            a1 = _mm256_fmadd_ps(load8(w + (size_t)K + k, bf16), xv, a1);
            a2 = _mm256_fmadd_ps(load8(w + 2 * (size_t)K + k, bf16), xv, a2);
            a3 = _mm256_fmadd_ps(load8(w + 3 * (size_t)K + k, bf16), xv, a3);
        }
        acc[0] = hsum(a0), acc[1] = hsum(a1), acc[2] = hsum(a2), acc[3] = hsum(a3);
    }
#endif
    for (int r = 0; r < rr; r++) {
        const uint16_t *wr = w + (size_t)r * K;
        for (int j = k; j < K; j++) acc[r] += h_to_float(wr[j], bf16) * x[j];
        y[r] = acc[r];
    }
}

int telechat_hmm(const float *x, const uint16_t *w, const float *bias, float *y, int M, int N, int K, int bf16,
                 int threads) {
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int n = 0; n < N; n += R) {
        const int rr = N - n < R ? N - n : R;
        float out[R];
        for (int m = 0; m < M; m++) {
            if (bf16) hrows(x + (size_t)m * K, w + (size_t)n * K, K, rr, 1, out);
            else hrows(x + (size_t)m * K, w + (size_t)n * K, K, rr, 0, out);
            for (int r = 0; r < rr; r++) y[(size_t)m * N + n + r] = out[r] + (bias ? bias[n + r] : 0.f);
        }
    }
    return 0;
}
"""

MAX_ROWS = 16  # above this many rows, dequantize once and let BLAS do the matrix product
_FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC"]


def supports(bits: int, in_features: int, out_features: int, group_size: int) -> bool:
    """The shapes the kernel handles: whole 16-byte loads per group, whole blocks of 4 rows."""
    return bits in (4, 8) and group_size % 32 == 0 and in_features % group_size == 0 and out_features % 4 == 0


def _compiler() -> str | None:
    for cc in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if cc and shutil.which(cc):
            return cc
    return None


@functools.lru_cache(maxsize=None)
def _library() -> ctypes.CDLL | None:
    """The compiled kernel (built on first use, then reused from the cache folder), or None."""
    from ..default_model import telechat_home

    cc = _compiler()
    if cc is None or sys.platform == "win32":
        return None
    key = hashlib.sha256("\0".join([_SOURCE, cc, *_FLAGS, os.uname().machine]).encode()).hexdigest()[:16]
    folder = telechat_home() / "kernels"
    lib = folder / f"qmm-{key}.so"
    if not lib.exists():
        try:
            folder.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=folder) as tmp:
                src = os.path.join(tmp, "qmm.c")
                with open(src, "w") as f:
                    f.write(_SOURCE)
                out = os.path.join(tmp, "qmm.so")
                subprocess.run([cc, *_FLAGS, src, "-o", out, "-lm"], check=True, capture_output=True, timeout=300)
                os.replace(out, lib)  # atomic: a concurrent build leaves one complete file
        except (OSError, subprocess.SubprocessError) as e:
            detail = getattr(e, "stderr", b"") or b""
            warnings.warn(f"telechat: could not build the native int4/int8 CPU kernel with {cc} "
                          f"({e}; {detail.decode(errors='replace')[-300:]}); using dequantize-then-matmul")
            return None
    handle = ctypes.CDLL(str(lib))
    handle.telechat_qmm.restype = handle.telechat_hmm.restype = ctypes.c_int
    handle.telechat_qmm.argtypes = [ctypes.c_void_p] * 6 + [ctypes.c_int] * 6
    handle.telechat_hmm.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int] * 5
    return handle


def available() -> bool:
    return _library() is not None


def _call(qp: int, sp: int, zp: int, bp: int | None, N: int, K: int, bits: int, group_size: int):
    """The kernel with one layer's pointers and sizes bound: x [M, K] fp32 contiguous -> y `shape` fp32.
    It keeps raw values only, so a cached one is right for whichever tensors have them."""
    fn, empty, f32, threads = _library().telechat_qmm, torch.empty, torch.float32, torch.get_num_threads

    def run(x: Tensor, shape) -> Tensor:
        y = empty(shape, dtype=f32)
        if fn(x.data_ptr(), qp, sp, zp, bp, y.data_ptr(), x.numel() // K, N, K, group_size, bits, threads()):
            raise MemoryError("telechat_qmm: out of memory")
        return y

    return run


_cached_call = functools.lru_cache(maxsize=4096)(_call)


def runner(q: Tensor, scales: Tensor, zeros: Tensor, bits: int, group_size: int, perm: Tensor | None = None,
           bias: Tensor | None = None):
    """x [..., K] -> x @ w.T (+ bias) [..., N] for one layer, bound once: a decode step makes hundreds of
    these calls, so all that can be is done here (the layer rebinds when its tensors move)."""
    N, K = q.shape[0], q.shape[1] * 8 // bits
    fp32_bias = bias is not None and bias.dtype == torch.float32
    call = _call(q.data_ptr(), scales.data_ptr(), zeros.data_ptr(), bias.data_ptr() if fp32_bias else None,
                 N, K, bits, group_size)
    add_bias = bias if bias is not None and not fp32_bias else None
    f32 = torch.float32

    def run(x: Tensor) -> Tensor:
        shape, dtype = x.shape[:-1] + (N,), x.dtype
        if perm is not None:
            x = x.reshape(-1, K)[:, perm]
        if dtype is not f32 or not x.is_contiguous():
            x = x.float().contiguous()
        y = call(x, shape)
        if dtype is not f32:
            y = y.to(dtype)
        return y if add_bias is None else y + add_bias

    return run


_HALF = {torch.float16: 0, torch.bfloat16: 1}


def half_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """F.linear(x, weight, bias) for fp32 x and a 16-bit weight [N, K] kept 16-bit, in fp32 arithmetic.

    A decode's few rows on CPU take the native kernel (the weight read once, as 16-bit, on every
    core); anything else upcasts the weight for the call."""
    N, K = weight.shape
    rows = x.numel() // K if K else 0
    if (x.dtype != torch.float32 or weight.dtype not in _HALF or x.device.type != "cpu" or not 0 < rows <= MAX_ROWS
            or not weight.is_contiguous() or torch.compiler.is_compiling() or not available()):
        return F.linear(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))
    xc = x.reshape(rows, K).contiguous()
    b = None if bias is None else bias.float().contiguous()
    y = torch.empty(*x.shape[:-1], N, dtype=torch.float32)
    _library().telechat_hmm(xc.data_ptr(), weight.data_ptr(), None if b is None else b.data_ptr(), y.data_ptr(),
                            rows, N, K, _HALF[weight.dtype], torch.get_num_threads())
    return y



@torch.library.custom_op("telechat::qmm", mutates_args=())
def qmm_op(x: Tensor, q: Tensor, scales: Tensor, zeros: Tensor, bits: int, group_size: int) -> Tensor:
    """x [M, K] in group order -> [M, N] fp32: the kernel as an operator torch.compile can place in a graph."""
    N, K = q.shape[0], q.shape[1] * 8 // bits
    call = _cached_call(q.data_ptr(), scales.data_ptr(), zeros.data_ptr(), None, N, K, bits, group_size)
    return call(x.float().contiguous(), (x.shape[0], N))


@qmm_op.register_fake
def _(x, q, scales, zeros, bits, group_size):
    return x.new_empty(x.shape[0], q.shape[0], dtype=torch.float32)
