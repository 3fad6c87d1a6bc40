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

/* Integer dot product of B codes with B int16 activations (4-bit: bytes hold columns 2j, 2j+1;
   xe/xo are the even/odd activations), for R rows `stride` bytes apart; sums land in acc[R]. */
#ifdef TELECHAT_AVX2
static void dot4(const int16_t *xe, const int16_t *xo, const uint8_t *q, size_t stride, int hb, __m256i *acc) {
    const __m128i m4 = _mm_set1_epi8(15);
    for (int j = 0; j < hb; j += 16) {
        __m256i e = _mm256_loadu_si256((const __m256i *)(xe + j)), o = _mm256_loadu_si256((const __m256i *)(xo + j));
        for (int r = 0; r < R; r++) {
            _mm_prefetch((const char *)(q + (r + R) * stride + j), _MM_HINT_T0);  /* the next rows' bytes */
            __m128i v = _mm_loadu_si128((const __m128i *)(q + r * stride + j));
            __m128i lo = _mm_and_si128(v, m4), hi = _mm_and_si128(_mm_srli_epi16(v, 4), m4);
            acc[r] = _mm256_add_epi32(acc[r], _mm256_madd_epi16(_mm256_cvtepu8_epi16(lo), e));
            acc[r] = _mm256_add_epi32(acc[r], _mm256_madd_epi16(_mm256_cvtepu8_epi16(hi), o));
        }
    }
}
static void dot8(const int16_t *x, const uint8_t *q, size_t stride, int n, __m256i *acc) {
    for (int j = 0; j < n; j += 16) {
        __m256i xv = _mm256_loadu_si256((const __m256i *)(x + j));
        for (int r = 0; r < R; r++) {
            _mm_prefetch((const char *)(q + (r + R) * stride + j), _MM_HINT_T0);
            __m256i v = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)(q + r * stride + j)));
            acc[r] = _mm256_add_epi32(acc[r], _mm256_madd_epi16(v, xv));
        }
    }
}
#endif

/* R output rows n..n+R-1 for one row of x: sum over groups g of
   s[g] * (sum over blocks b of g of sx[b] * (xq_b . q_b) - z[g] * xsum[g]). */
static void rows(const int16_t *xq, const float *sx, const float *xsum, const uint8_t *q, size_t stride,
                 const uint16_t *s, const uint8_t *z, int G, int gs, int B, int bits, int K, float *y) {
    const int nb = gs / B;
    float zterm[R] = {0};
#ifdef TELECHAT_AVX2
    __m256 total[R];
    for (int r = 0; r < R; r++) total[r] = _mm256_setzero_ps();
#else
    float total[R] = {0};
#endif
    for (int g = 0; g < G; g++) {
        float sw[R];
        for (int r = 0; r < R; r++) {
            sw[r] = half_to_float(s[(size_t)r * G + g]);
            zterm[r] += sw[r] * (float)z[(size_t)r * G + g] * xsum[g];
        }
        for (int b = 0; b < nb; b++) {
            const size_t col = (size_t)g * gs + (size_t)b * B;  /* first column of the block */
#ifdef TELECHAT_AVX2
            __m256i acc[R];
            for (int r = 0; r < R; r++) acc[r] = _mm256_setzero_si256();
            if (bits == 4) dot4(xq + col / 2, xq + K / 2 + col / 2, q + col / 2, stride, B / 2, acc);
            else dot8(xq + col, q + col, stride, B, acc);
            for (int r = 0; r < R; r++)
                total[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[r]), _mm256_set1_ps(sx[g * nb + b] * sw[r]), total[r]);
#else
            for (int r = 0; r < R; r++) {
                const uint8_t *qr = q + r * stride;
                int32_t acc = 0;
                if (bits == 4)
                    for (size_t j = col / 2; j < (col + B) / 2; j++)
                        acc += (qr[j] & 15) * (int32_t)xq[j] + (qr[j] >> 4) * (int32_t)xq[K / 2 + j];
                else
                    for (size_t j = col; j < col + B; j++) acc += qr[j] * (int32_t)xq[j];
                total[r] += (float)acc * sx[g * nb + b] * sw[r];
            }
#endif
        }
    }
#ifdef TELECHAT_AVX2
    for (int r = 0; r < R; r++) y[r] = hsum(total[r]) - zterm[r];
#else
    for (int r = 0; r < R; r++) y[r] = total[r] - zterm[r];
#endif
}

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
    fn = handle.telechat_qmm
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_void_p] * 6 + [ctypes.c_int] * 6
    return handle


def available() -> bool:
    return _library() is not None


def _call(qp: int, sp: int, zp: int, bp: int | None, N: int, K: int, bits: int, group_size: int):
    """The kernel with one layer's pointers and sizes bound; it keeps raw values only, so a cached one is
    right for whichever tensors have them."""
    fn = _library().telechat_qmm

    def run(x: Tensor, shape) -> Tensor:  # x: M x K, fp32, contiguous
        y = torch.empty(shape, dtype=torch.float32)
        if fn(x.data_ptr(), qp, sp, zp, bp, y.data_ptr(), x.numel() // K, N, K, group_size, bits,
              torch.get_num_threads()):
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

    def run(x: Tensor) -> Tensor:
        shape, dtype = x.shape[:-1] + (N,), x.dtype
        if perm is not None:
            x = x.reshape(-1, K)[:, perm]
        if dtype != torch.float32 or not x.is_contiguous():
            x = x.float().contiguous()
        y = call(x, shape)
        if dtype != torch.float32:
            y = y.to(dtype)
        return y if add_bias is None else y + add_bias

    return run


@torch.library.custom_op("telechat::qmm", mutates_args=())
def qmm_op(x: Tensor, q: Tensor, scales: Tensor, zeros: Tensor, bits: int, group_size: int) -> Tensor:
    """x [M, K] in group order -> [M, N] fp32: the kernel as an operator torch.compile can place in a graph."""
    N, K = q.shape[0], q.shape[1] * 8 // bits
    call = _cached_call(q.data_ptr(), scales.data_ptr(), zeros.data_ptr(), None, N, K, bits, group_size)
    return call(x.float().contiguous(), (x.shape[0], N))


@qmm_op.register_fake
def _(x, q, scales, zeros, bits, group_size):
    return x.new_empty(x.shape[0], q.shape[0], dtype=torch.float32)
