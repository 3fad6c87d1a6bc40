// Integer-dot-product matmul of activations against 4/8-bit weight codes, for one instruction set.
//
// Compiled once per instruction set with -DTELECHAT_ISA=0|1|2 (portable C, AVX2+FMA+F16C, AVX-512
// BW/VL/VNNI) and -DTELECHAT_SUFFIX=_portable|_avx2|_avx512; qgemm_op.cpp picks one at run time.
// No torch headers here: their inline functions compiled with AVX-512 flags could otherwise be the
// copy the linker keeps for the whole library.
//
// Weights, "rows" layout: row n of codes holds K/32 blocks of 32 columns; 4-bit: 16 bytes per block,
// the low nibble of byte j is column j and the high nibble column j + 16 (GGML's Q4 order); 8-bit: 32
// bytes. Group g (group_size columns, a multiple of 32) has a fp16 scale s and either a fp16 offset m
// (w = s q + m, GGML Q4_1) or a uint8 zero point z (w = s (q - z), GPTQ; Q4_0 and Q8_0 are z = 8, 128).
//
// Activations: each block of 32 is rounded to int8 with its own scale d = max|x| / 127, as llama.cpp
// does for its Q8 dot products; xd8 holds d repeated 8 times per block (one vector lane group), xsg
// per group the sum of d * sum(q) over its blocks. Then, exactly up to fp32 rounding,
//     y[m, n] = sum_blocks s_g d_b (q . xq)_b  +  sum_g offset_g xsg[m, g],   offset = m or -s z.
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#if TELECHAT_ISA >= 1
#include <immintrin.h>
#endif

#define TC_CAT2(a, b) a##b
#define TC_CAT(a, b) TC_CAT2(a, b)
#define TC_FN(name) TC_CAT(name, TELECHAT_SUFFIX)

namespace {

inline float half_to_float(uint16_t h) {
#if TELECHAT_ISA >= 1
    return _cvtsh_ss(h);
#else
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 31, man = h & 1023, bits;
    if (exp == 0 && man == 0) {
        bits = sign;
    } else if (exp == 0) {  // subnormal
        exp = 113;
        while (!(man & 1024)) { man <<= 1; exp--; }
        bits = sign | (exp << 23) | ((man & 1023) << 13);
    } else if (exp == 31) {
        bits = sign | 0x7f800000 | (man << 13);
    } else {
        bits = sign | ((exp + 112) << 23) | (man << 13);
    }
    float f;
    std::memcpy(&f, &bits, 4);
    return f;
#endif
}

inline float bf16_to_float(uint16_t h) {
    uint32_t b = (uint32_t)h << 16;
    float f;
    std::memcpy(&f, &b, 4);
    return f;
}

// Row n's per-group offsets (m, or -s z; plus 128 s where the 8-bit AVX2 path multiplies by q - 128) and
// per-block scales, so the block loop neither converts nor divides.
inline void row_params(const uint16_t *s, const uint16_t *mins, const uint8_t *zeros, int64_t G, int64_t bpg,
                       float shift, float *off, float *bsc) {
    int64_t g = 0;
#if TELECHAT_ISA >= 1
    for (; g + 8 <= G; g += 8) {
        const __m256 sg = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(s + g)));
        __m256 o = mins ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(mins + g)))
                        : _mm256_mul_ps(_mm256_sub_ps(_mm256_setzero_ps(), sg),
                                        _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(zeros + g)))));
        _mm256_storeu_ps(off + g, _mm256_fmadd_ps(_mm256_set1_ps(shift), sg, o));
        if (bpg == 1) {
            _mm256_storeu_ps(bsc + g, sg);
        } else {
            float v[8];
            _mm256_storeu_ps(v, sg);
            for (int i = 0; i < 8; i++)
                for (int64_t j = 0; j < bpg; j++) bsc[(g + i) * bpg + j] = v[i];
        }
    }
#endif
    for (; g < G; g++) {
        const float sg = half_to_float(s[g]);
        off[g] = (mins ? half_to_float(mins[g]) : -sg * (float)zeros[g]) + shift * sg;
        for (int64_t j = 0; j < bpg; j++) bsc[g * bpg + j] = sg;
    }
}

// sum a[i] b[i]
inline float dot_f32(const float *a, const float *b, int64_t n) {
    int64_t i = 0;
    float t = 0.f;
#if TELECHAT_ISA >= 1
    __m256 acc = _mm256_setzero_ps();
    for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    t = _mm_cvtss_f32(_mm_add_ss(h, _mm_movehdup_ps(h)));
#endif
    for (; i < n; i++) t += a[i] * b[i];
    return t;
}

#if TELECHAT_ISA >= 1
inline float hsum256(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

// 32 codes of one block as bytes in column order.
inline __m256i codes32(const uint8_t *p, int bits) {
    if (bits == 8) return _mm256_loadu_si256((const __m256i *)p);
    const __m128i v = _mm_loadu_si128((const __m128i *)p), m4 = _mm_set1_epi8(15);
    return _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_and_si128(v, m4)),
                                   _mm_and_si128(_mm_srli_epi16(v, 4), m4), 1);
}

// 8 int32 lanes whose sum is q . x for 32 codes (unsigned; 8-bit ones as q - 128) and 32 int8 x.
inline __m256i dot32(__m256i q, __m256i x, int bits) {
    const __m256i ones = _mm256_set1_epi16(1);
    if (bits == 4) return _mm256_madd_epi16(_mm256_maddubs_epi16(q, x), ones);  // 15 * 127 * 2 fits int16
    // maddubs takes one unsigned operand: |q - 128| and x carrying q - 128's sign (128 * 127 * 2 fits).
    const __m256i qs = _mm256_xor_si256(q, _mm256_set1_epi8((char)0x80));
    return _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_abs_epi8(qs), _mm256_sign_epi8(x, qs)), ones);
}
#endif

#if TELECHAT_ISA >= 2
// 64 codes (two blocks) as bytes in column order.
inline __m512i codes64(const uint8_t *p, int bits) {
    if (bits == 8) return _mm512_loadu_si512((const void *)p);
    const __m256i v = _mm256_loadu_si256((const __m256i *)p), m4 = _mm256_set1_epi8(15);
    const __m256i lo = _mm256_and_si256(v, m4), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
    // [lo0 lo1 hi0 hi1] (16 bytes each) -> [lo0 hi0 lo1 hi1]: block 0's columns, then block 1's
    const __m512i w = _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
    return _mm512_shuffle_i64x2(w, w, 0xD8);
}
#endif

// MR activation rows against one weight row; bsc[b] is block b's weight scale. Returns the block sums
// (no offsets) in out. Two accumulators per row hide the FMA latency when MR is small.
template <int MR>
inline void row_dot(const int8_t *xq, const float *xd8, int64_t K, const uint8_t *q, const float *bsc, int bits,
                    float *out) {
    const int64_t nb = K / 32, bbytes = bits == 4 ? 16 : 32;
#if TELECHAT_ISA >= 2
    __m512 acc[2][MR];
    for (int r = 0; r < MR; r++) acc[0][r] = acc[1][r] = _mm512_setzero_ps();
    int64_t b = 0;
    auto pair = [&](int64_t b, __m512 *a) {
        const __m512i w = codes64(q + b * bbytes, bits);
        const __m512 sv = _mm512_mask_blend_ps((__mmask16)0xFF00, _mm512_set1_ps(bsc[b]), _mm512_set1_ps(bsc[b + 1]));
        for (int r = 0; r < MR; r++) {
            const __m512i xv = _mm512_loadu_si512((const void *)(xq + r * K + b * 32));
            const __m512i d = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w, xv);
            a[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), _mm512_mul_ps(sv, _mm512_loadu_ps(xd8 + r * nb * 8 + b * 8)),
                                   a[r]);
        }
    };
    for (; b + 4 <= nb; b += 4) {
        pair(b, acc[0]);
        pair(b + 2, acc[1]);
    }
    for (; b + 2 <= nb; b += 2) pair(b, acc[0]);
    float total[MR];
    for (int r = 0; r < MR; r++) total[r] = _mm512_reduce_add_ps(_mm512_add_ps(acc[0][r], acc[1][r]));
    for (; b < nb; b++) {  // the odd last block, if any
        const __m256i w = codes32(q + b * bbytes, bits);
        for (int r = 0; r < MR; r++) {
            const __m256i xv = _mm256_loadu_si256((const __m256i *)(xq + r * K + b * 32));
            const __m256i d = bits == 4 ? dot32(w, xv, 4) : _mm256_dpbusd_epi32(_mm256_setzero_si256(), w, xv);
            total[r] += hsum256(_mm256_cvtepi32_ps(d)) * bsc[b] * xd8[r * nb * 8 + b * 8];
        }
    }
    for (int r = 0; r < MR; r++) out[r] = total[r];
#elif TELECHAT_ISA == 1
    __m256 acc[2][MR];
    for (int r = 0; r < MR; r++) acc[0][r] = acc[1][r] = _mm256_setzero_ps();
    auto block = [&](int64_t b, __m256 *a) {
        const __m256i w = codes32(q + b * bbytes, bits);
        const __m256 sv = _mm256_set1_ps(bsc[b]);
        for (int r = 0; r < MR; r++) {
            const __m256i xv = _mm256_loadu_si256((const __m256i *)(xq + r * K + b * 32));
            a[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot32(w, xv, bits)),
                                   _mm256_mul_ps(sv, _mm256_loadu_ps(xd8 + r * nb * 8 + b * 8)), a[r]);
        }
    };
    int64_t b = 0;
    for (; b + 2 <= nb; b += 2) {
        block(b, acc[0]);
        block(b + 1, acc[1]);
    }
    if (b < nb) block(b, acc[0]);
    for (int r = 0; r < MR; r++) out[r] = hsum256(_mm256_add_ps(acc[0][r], acc[1][r]));
#else
    for (int r = 0; r < MR; r++) out[r] = 0.f;
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *qb = q + b * bbytes;
        for (int r = 0; r < MR; r++) {
            const int8_t *xb = xq + r * K + b * 32;
            int32_t dot = 0;
            if (bits == 4) {
                for (int j = 0; j < 16; j++) dot += (qb[j] & 15) * (int32_t)xb[j] + (qb[j] >> 4) * (int32_t)xb[j + 16];
            } else {
                for (int j = 0; j < 32; j++) dot += qb[j] * (int32_t)xb[j];
            }
            out[r] += (float)dot * bsc[b] * xd8[r * nb * 8 + b * 8];
        }
    }
#endif
}


// Vectors of fp32 for the dense and attention kernels: 16 lanes on AVX-512, 8 on AVX2. Element types:
// T = 0 fp32, 1 bf16, 2 IEEE half.
#if TELECHAT_ISA == 2
typedef __m512 vf;
constexpr int64_t VW = 16;
inline vf vzero() { return _mm512_setzero_ps(); }
inline vf vset(float f) { return _mm512_set1_ps(f); }
inline vf vloadf(const float *p) { return _mm512_loadu_ps(p); }
inline void vstore(float *p, vf v) { _mm512_storeu_ps(p, v); }
inline vf vfma(vf a, vf b, vf c) { return _mm512_fmadd_ps(a, b, c); }
inline float vsum(vf v) { return _mm512_reduce_add_ps(v); }
template <int T> inline vf vload(const void *p, int64_t i) {
    if constexpr (T == 0) {
        return _mm512_loadu_ps((const float *)p + i);
    } else {
        const __m256i h = _mm256_loadu_si256((const __m256i *)((const uint16_t *)p + i));
        if constexpr (T == 1) return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
        return _mm512_cvtph_ps(h);
    }
}
#elif TELECHAT_ISA == 1
typedef __m256 vf;
constexpr int64_t VW = 8;
inline vf vzero() { return _mm256_setzero_ps(); }
inline vf vset(float f) { return _mm256_set1_ps(f); }
inline vf vloadf(const float *p) { return _mm256_loadu_ps(p); }
inline void vstore(float *p, vf v) { _mm256_storeu_ps(p, v); }
inline vf vfma(vf a, vf b, vf c) { return _mm256_fmadd_ps(a, b, c); }
inline float vsum(vf v) { return hsum256(v); }
template <int T> inline vf vload(const void *p, int64_t i) {
    if constexpr (T == 0) {
        return _mm256_loadu_ps((const float *)p + i);
    } else {
        const __m128i h = _mm_loadu_si128((const __m128i *)((const uint16_t *)p + i));
        if constexpr (T == 1) return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
        return _mm256_cvtph_ps(h);
    }
}
#endif

template <int T> inline float sload(const void *p, int64_t i) {
    if constexpr (T == 0) return ((const float *)p)[i];
    if constexpr (T == 1) return bf16_to_float(((const uint16_t *)p)[i]);
    return half_to_float(((const uint16_t *)p)[i]);
}

// sum x[i] w[i] for a weight of element type T
template <int T> inline float dot_t(const float *x, const void *w, int64_t n) {
    int64_t i = 0;
    float t = 0.f;
#if TELECHAT_ISA >= 1
    vf a0 = vzero(), a1 = vzero();
    for (; i + 2 * VW <= n; i += 2 * VW) {
        a0 = vfma(vload<T>(w, i), vloadf(x + i), a0);
        a1 = vfma(vload<T>(w, i + VW), vloadf(x + i + VW), a1);
    }
    for (; i + VW <= n; i += VW) a0 = vfma(vload<T>(w, i), vloadf(x + i), a0);
    t = vsum(vfma(a1, vset(1.f), a0));  // one horizontal sum
#endif
    for (; i < n; i++) t += sload<T>(w, i) * x[i];
    return t;
}

// y[n] += a * v[n] for v of element type T
template <int T> inline void axpy_t(float a, const void *v, float *y, int64_t n) {
    int64_t i = 0;
#if TELECHAT_ISA >= 1
    const vf av = vset(a);
    for (; i + VW <= n; i += VW) vstore(y + i, vfma(av, vload<T>(v, i), vloadf(y + i)));
#endif
    for (; i < n; i++) y[i] += a * sload<T>(v, i);
}

template <int T>
void dgemm_t(const float *x, const void *w, const float *bias, float *y, int64_t M, int64_t N, int64_t K, int64_t n0,
             int64_t n1) {
    const int64_t es = T == 0 ? 4 : 2;
    for (int64_t n = n0; n < n1; n++) {
        const void *wn = (const char *)w + n * K * es;
        const float b = bias ? bias[n] : 0.f;
        int64_t m = 0;
#if TELECHAT_ISA >= 1
        for (; m + 4 <= M; m += 4) {  // four rows share each weight load
            vf a[4] = {vzero(), vzero(), vzero(), vzero()};
            int64_t k = 0;
            for (; k + VW <= K; k += VW) {
                const vf wv = vload<T>(wn, k);
                for (int r = 0; r < 4; r++) a[r] = vfma(wv, vloadf(x + (m + r) * K + k), a[r]);
            }
            for (int r = 0; r < 4; r++) {
                float t = vsum(a[r]);
                for (int64_t kk = k; kk < K; kk++) t += sload<T>(wn, kk) * x[(m + r) * K + kk];
                y[(m + r) * N + n] = t + b;
            }
        }
#endif
        for (; m < M; m++) y[m * N + n] = dot_t<T>(x + m * K, wn, K) + b;
    }
}

#if TELECHAT_ISA >= 1
// bf16 weights without a widening shuffle: a vector of 2 VW bf16 splits into its even elements (shifted
// up 16 bits) and its odd ones (high halves masked), each exactly their fp32 value; the activations are
// rearranged to match once per call (xp: per block of 2 VW, its even then its odd elements).
#if TELECHAT_ISA == 2
inline vf bf16_even(__m512i w) { return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16)); }
inline vf bf16_odd(__m512i w) { return _mm512_castsi512_ps(_mm512_and_si512(w, _mm512_set1_epi32(-65536))); }
inline __m512i load_pairs(const uint16_t *p) { return _mm512_loadu_si512((const void *)p); }
#else
inline vf bf16_even(__m256i w) { return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16)); }
inline vf bf16_odd(__m256i w) { return _mm256_castsi256_ps(_mm256_and_si256(w, _mm256_set1_epi32(-65536))); }
inline __m256i load_pairs(const uint16_t *p) { return _mm256_loadu_si256((const __m256i *)p); }
#endif

template <int T> inline void load_block(const char *w, int64_t k, vf &a, vf &b) {
    if constexpr (T == 1) {
        const auto p = load_pairs((const uint16_t *)w + k);
        a = bf16_even(p);
        b = bf16_odd(p);
    } else {
        a = vload<T>(w, k);
        b = vload<T>(w, k + VW);
    }
}

// y = x W^T for K a multiple of 2 VW, in tiles of MR activation rows x R weight rows (16 independent sums;
// each weight vector loaded once per tile); bf16 weights as even/odd halves against rearranged activations.
template <int T>
void dgemm_tiled(const float *x, const void *w, const float *bias, float *y, int64_t M, int64_t N, int64_t K,
                 int64_t n0, int64_t n1) {
    constexpr int64_t B2 = 2 * VW, es = T == 0 ? 4 : 2;
    constexpr int R = 4, MR = 4;
    const float *xp = x;
    if constexpr (T == 1) {
        // Scratch without std::vector: an inline template instantiated here, with this file's vector
        // flags, could become the copy the whole library links to.
        thread_local float *buf = nullptr;
        thread_local int64_t cap = 0;
        if (cap < M * K) {
            std::free(buf);
            buf = (float *)std::malloc(sizeof(float) * M * K);
            cap = buf ? M * K : 0;
            if (!buf) return dgemm_t<1>(x, w, bias, y, M, N, K, n0, n1);
        }
        for (int64_t m = 0; m < M; m++)
            for (int64_t b = 0; b < K; b += B2)
                for (int64_t i = 0; i < VW; i++) {
                    buf[m * K + b + i] = x[m * K + b + 2 * i];
                    buf[m * K + b + VW + i] = x[m * K + b + 2 * i + 1];
                }
        xp = buf;
    }
    for (int64_t n = n0; n < n1; n += R) {
        const int rn = n1 - n < R ? (int)(n1 - n) : R;
        const char *wr[R];
        for (int r = 0; r < R; r++) wr[r] = (const char *)w + (n + (r < rn ? r : 0)) * K * es;  // spare: row n again
        int64_t m = 0;
        for (; m + MR <= M; m += MR) {
            vf acc[MR][R];
            for (int i = 0; i < MR; i++)
                for (int r = 0; r < R; r++) acc[i][r] = vzero();
            for (int64_t k = 0; k < K; k += B2) {
                vf wa[R], wb[R];
                for (int r = 0; r < R; r++) load_block<T>(wr[r], k, wa[r], wb[r]);
                for (int i = 0; i < MR; i++) {
                    const vf xa = vloadf(xp + (m + i) * K + k), xb = vloadf(xp + (m + i) * K + k + VW);
                    for (int r = 0; r < R; r++) acc[i][r] = vfma(wa[r], xa, vfma(wb[r], xb, acc[i][r]));
                }
            }
            for (int i = 0; i < MR; i++)
                for (int r = 0; r < rn; r++) y[(m + i) * N + n + r] = vsum(acc[i][r]) + (bias ? bias[n + r] : 0.f);
        }
        for (; m < M; m++) {
            const float *xm = xp + m * K;
            vf acc[R] = {vzero(), vzero(), vzero(), vzero()};
            for (int64_t k = 0; k < K; k += B2) {
                const vf xa = vloadf(xm + k), xb = vloadf(xm + k + VW);
                for (int r = 0; r < R; r++) {
                    vf wa, wb;
                    load_block<T>(wr[r], k, wa, wb);
                    acc[r] = vfma(wa, xa, vfma(wb, xb, acc[r]));
                }
            }
            for (int r = 0; r < rn; r++) y[m * N + n + r] = vsum(acc[r]) + (bias ? bias[n + r] : 0.f);
        }
    }
}
#endif

// e^x for a vector (x <= 88), Cephes' single-precision polynomial: within 2 ulp of expf.
#if TELECHAT_ISA >= 1
inline vf vexp(vf x) {
#if TELECHAT_ISA == 2
    x = _mm512_max_ps(x, vset(-87.3f));
    const vf n = _mm512_roundscale_ps(vfma(x, vset(1.44269504088896341f), vset(0.5f)),
                                      _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
#else
    x = _mm256_max_ps(x, vset(-87.3f));
    const vf n = _mm256_floor_ps(vfma(x, vset(1.44269504088896341f), vset(0.5f)));
#endif
    x = vfma(n, vset(-0.693359375f), x);
    x = vfma(n, vset(2.12194440e-4f), x);
    vf y = vset(1.9875691500e-4f);
    y = vfma(y, x, vset(1.3981999507e-3f));
    y = vfma(y, x, vset(8.3334519073e-3f));
    y = vfma(y, x, vset(4.1665795894e-2f));
    y = vfma(y, x, vset(1.6666665459e-1f));
    y = vfma(y, x, vset(5.0000001201e-1f));
#if TELECHAT_ISA == 2
    y = _mm512_add_ps(vfma(y, _mm512_mul_ps(x, x), x), vset(1.f));
    const __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
    return _mm512_mul_ps(y, _mm512_castsi512_ps(e));
#else
    y = _mm256_add_ps(vfma(y, _mm256_mul_ps(x, x), x), vset(1.f));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
#endif
}
#endif

template <int T>
void attend_t(const float *q, const char *k, const char *v, int64_t stride, const int64_t *slots, int64_t S, int64_t d,
              float scale, float *out, float *p) {
    const int64_t es = T == 0 ? 4 : 2;
    float mx = -INFINITY;
    for (int64_t s = 0; s < S; s++) {
        p[s] = scale * dot_t<T>(q, k + slots[s] * stride * es, d);
        mx = std::fmax(mx, p[s]);
    }
    float sum = 0.f;
    int64_t s = 0;
#if TELECHAT_ISA >= 1
    vf acc = vzero();
    for (; s + VW <= S; s += VW) {
        const vf e = vexp(vfma(vloadf(p + s), vset(1.f), vset(-mx)));
        vstore(p + s, e);
        acc = vfma(e, vset(1.f), acc);
    }
    sum = vsum(acc);
#endif
    for (; s < S; s++) sum += (p[s] = std::exp(p[s] - mx));
    const float inv = 1.f / sum;
    for (int64_t i = 0; i < d; i++) out[i] = 0.f;
    for (int64_t s = 0; s < S; s++) axpy_t<T>(p[s] * inv, v + slots[s] * stride * es, out, d);
}

}  // namespace

extern "C" {

// x [M, K] fp32 -> xq [M, K] int8, xd8 [M, K/32 * 8], xsg [M, K/gs] (see the top of the file).
void TC_FN(telechat_quantize_rows)(const float *x, int64_t M, int64_t K, int64_t gs, int8_t *xq, float *xd8,
                                   float *xsg) {
    const int64_t nb = K / 32, G = K / gs, bpg = gs / 32;
    for (int64_t m = 0; m < M; m++) {
        for (int64_t g = 0; g < G; g++) xsg[m * G + g] = 0.f;
        for (int64_t b = 0; b < nb; b++) {
            const float *xb = x + m * K + b * 32;
            float amax = 0.f;
            for (int j = 0; j < 32; j++) amax = std::fmax(amax, std::fabs(xb[j]));
            const float d = amax / 127.f, inv = amax > 0.f ? 127.f / amax : 0.f;
            int32_t sum = 0;
            for (int j = 0; j < 32; j++) {
                const int32_t v = (int32_t)std::nearbyint(xb[j] * inv);
                xq[m * K + b * 32 + j] = (int8_t)v;
                sum += v;
            }
            for (int j = 0; j < 8; j++) xd8[(m * nb + b) * 8 + j] = d;
            xsg[m * G + b / bpg] += d * (float)sum;
        }
    }
}

// y[m, n] for n in [n0, n1) and all M rows; y is [M, N]; bias [N] fp32 or null; exactly one of mins/zeros;
// off: scratch for K/gs + K/32 floats.
void TC_FN(telechat_qgemm)(const int8_t *xq, const float *xd8, const float *xsg, int64_t M, const uint8_t *codes,
                           const uint16_t *scales, const uint16_t *mins, const uint8_t *zeros, const float *bias,
                           float *y, int64_t N, int64_t K, int64_t gs, int bits, int64_t n0, int64_t n1, float *off) {
    const int64_t G = K / gs, bpg = gs / 32, nb = K / 32, stride = bits == 4 ? K / 2 : K;
    const float shift = (TELECHAT_ISA == 1 && bits == 8) ? 128.f : 0.f;
    float *bsc = off + G;
    for (int64_t n = n0; n < n1; n++) {
        const uint8_t *q = codes + n * stride;
        const uint16_t *s = scales + n * G;
        row_params(s, mins ? mins + n * G : nullptr, zeros ? zeros + n * G : nullptr, G, bpg, shift, off, bsc);
        const float bn = bias ? bias[n] : 0.f;
        float out[4];
        int64_t m = 0;
        for (; m + 4 <= M; m += 4) {
            row_dot<4>(xq + m * K, xd8 + m * nb * 8, K, q, bsc, bits, out);
            for (int r = 0; r < 4; r++) {
                y[(m + r) * N + n] = out[r] + bn + dot_f32(off, xsg + (m + r) * G, G);
            }
        }
        for (; m < M; m++) {
            row_dot<1>(xq + m * K, xd8 + m * nb * 8, K, q, bsc, bits, out);
            y[m * N + n] = out[0] + bn + dot_f32(off, xsg + m * G, G);
        }
    }
}

// y [M, N] rows n0..n1 = x [M, K] fp32 times w [N, K] of element type wtype (0 fp32, 1 bf16, 2 half), in fp32.
void TC_FN(telechat_dgemm)(const float *x, const void *w, int wtype, const float *bias, float *y, int64_t M, int64_t N,
                           int64_t K, int64_t n0, int64_t n1) {
#if TELECHAT_ISA >= 1
    if (K % (2 * VW) == 0) {
        if (wtype == 0) dgemm_tiled<0>(x, w, bias, y, M, N, K, n0, n1);
        else if (wtype == 1) dgemm_tiled<1>(x, w, bias, y, M, N, K, n0, n1);
        else dgemm_tiled<2>(x, w, bias, y, M, N, K, n0, n1);
        return;
    }
#endif
    if (wtype == 0) dgemm_t<0>(x, w, bias, y, M, N, K, n0, n1);
    else if (wtype == 1) dgemm_t<1>(x, w, bias, y, M, N, K, n0, n1);
    else dgemm_t<2>(x, w, bias, y, M, N, K, n0, n1);
}

// One query head q [d] over S cached positions: out [d] = softmax(scale q . k_s) weighted sum of v_s, where
// k_s starts at element slots[s] * stride of k (v likewise), of element type kvtype; p: scratch for S floats.
void TC_FN(telechat_attend)(const float *q, const void *k, const void *v, int kvtype, int64_t stride,
                            const int64_t *slots, int64_t S, int64_t d, float scale, float *out, float *p) {
    const char *kc = (const char *)k, *vc = (const char *)v;
    if (kvtype == 0) attend_t<0>(q, kc, vc, stride, slots, S, d, scale, out, p);
    else if (kvtype == 1) attend_t<1>(q, kc, vc, stride, slots, S, d, scale, out, p);
    else attend_t<2>(q, kc, vc, stride, slots, S, d, scale, out, p);
}

}  // extern "C"
