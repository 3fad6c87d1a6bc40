// torch operators over qgemm_kernel.cpp: telechat::qlinear, telechat::hlinear, telechat::cpu_isa.
// The instruction set is chosen at run time from the CPU's features (AVX-512 VNNI, else AVX2, else
// portable C); TELECHAT_CPU_ISA or telechat::cpu_isa("name") can force a lower one.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <cstdlib>
#include <string>
#include <vector>

#include "isa.h"

namespace {

using telechat::Isa;

// Best first; an entry is usable when it was compiled in (its symbols are linked) and the CPU has it.
std::vector<Isa> usable() {
    std::vector<Isa> out;
    __builtin_cpu_init();
    if (telechat_qgemm_avx512 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni"))
        out.push_back({"avx512_vnni", telechat_quantize_rows_avx512, telechat_qgemm_avx512, telechat_dgemm_avx512,
                       telechat_attend_avx512});
    if (telechat_qgemm_avx2 && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
        __builtin_cpu_supports("f16c"))
        out.push_back({"avx2", telechat_quantize_rows_avx2, telechat_qgemm_avx2, telechat_dgemm_avx2,
                       telechat_attend_avx2});
    out.push_back({"portable", telechat_quantize_rows_portable, telechat_qgemm_portable, telechat_dgemm_portable,
                    telechat_attend_portable});
    return out;
}

const Isa *choose(const std::string &want) {
    static const std::vector<Isa> all = usable();
    if (want.empty() || want == "auto") return &all.front();
    for (const Isa &isa : all)
        if (want == isa.name) return &isa;
    std::string names;
    for (const Isa &isa : all) names += std::string(names.empty() ? "" : ", ") + isa.name;
    TORCH_CHECK(false, "telechat: instruction set '", want, "' is not available on this CPU (usable: auto, ", names,
                ")");
    return nullptr;
}

const Isa *&active() {
    static const Isa *isa = [] {
        const char *env = std::getenv("TELECHAT_CPU_ISA");
        try {
            return choose(env ? env : "auto");
        } catch (const c10::Error &) {  // a name this CPU lacks: the best it has (kernels.py warns)
            return choose("auto");
        }
    }();
    return isa;
}

}  // namespace

const telechat::Isa *telechat::active_isa() { return active(); }

namespace {

std::string cpu_isa(const std::string &want) {
    if (!want.empty()) active() = choose(want);
    return active()->name;
}

void check_cpu(const at::Tensor &t, const char *name, at::ScalarType dtype) {
    TORCH_CHECK(t.device().is_cpu(), "telechat::qlinear: ", name, " must be on the CPU, got ", t.device());
    TORCH_CHECK(t.scalar_type() == dtype, "telechat::qlinear: ", name, " must be ", dtype, ", got ", t.scalar_type());
    TORCH_CHECK(t.is_contiguous(), "telechat::qlinear: ", name, " must be contiguous");
}

// x [..., K] (any float dtype) -> [..., N] in x's dtype: see qgemm_kernel.cpp for the weight layout.
at::Tensor qlinear(const at::Tensor &x, const at::Tensor &codes, const at::Tensor &scales,
                   const c10::optional<at::Tensor> &mins, const c10::optional<at::Tensor> &zeros,
                   const c10::optional<at::Tensor> &bias, int64_t bits, int64_t group_size) {
    TORCH_CHECK(bits == 4 || bits == 8, "telechat::qlinear: bits must be 4 or 8, got ", bits);
    TORCH_CHECK(codes.dim() == 2, "telechat::qlinear: codes must be [N, K*bits/8], got ", codes.sizes());
    const int64_t N = codes.size(0), K = codes.size(1) * 8 / bits, gs = group_size;
    TORCH_CHECK(x.size(-1) == K, "telechat::qlinear: x has ", x.size(-1), " columns, the weight ", K);
    TORCH_CHECK(K % 32 == 0 && gs % 32 == 0 && gs > 0 && K % gs == 0, "telechat::qlinear: in_features ", K,
                " and group_size ", gs, " must be multiples of 32, group_size dividing in_features");
    const int64_t G = K / gs;
    TORCH_CHECK(G <= 8192, "telechat::qlinear: at most 8192 groups per row, got ", G);
    check_cpu(codes, "codes", at::kByte);
    check_cpu(scales, "scales", at::kHalf);
    TORCH_CHECK(scales.numel() == N * G, "telechat::qlinear: scales must be [", N, ", ", G, "], got ", scales.sizes());
    TORCH_CHECK(mins.has_value() != zeros.has_value(), "telechat::qlinear: give exactly one of mins and zeros");
    if (mins) {
        check_cpu(*mins, "mins", at::kHalf);
        TORCH_CHECK(mins->numel() == N * G, "telechat::qlinear: mins must be [", N, ", ", G, "]");
    } else {
        check_cpu(*zeros, "zeros", at::kByte);
        TORCH_CHECK(zeros->numel() == N * G, "telechat::qlinear: zeros must be [", N, ", ", G, "]");
    }
    if (bias) {
        check_cpu(*bias, "bias", at::kFloat);
        TORCH_CHECK(bias->numel() == N, "telechat::qlinear: bias must have ", N, " values");
    }
    TORCH_CHECK(x.device().is_cpu(), "telechat::qlinear: x must be on the CPU, got ", x.device());
    const at::Tensor xf = x.reshape({-1, K}).to(at::kFloat).contiguous();
    const int64_t M = xf.size(0), nb = K / 32;
    auto out_shape = x.sizes().vec();
    out_shape.back() = N;
    at::Tensor y = at::empty({M, N}, xf.options());
    if (M > 0) {
        const Isa *isa = active();
        // Scratch for the rounded activations: reused per calling thread (a decode step makes hundreds of calls).
        thread_local std::vector<int8_t> xq_buf;
        thread_local std::vector<float> xd_buf, xs_buf;
        xq_buf.resize(M * K);
        xd_buf.resize(M * nb * 8);
        xs_buf.resize(M * G);
        const float *xp = xf.data_ptr<float>();
        int8_t *xqp = xq_buf.data();
        float *xdp = xd_buf.data(), *xsp = xs_buf.data();
        at::parallel_for(0, M, 16, [&](int64_t m0, int64_t m1) {
            isa->quantize(xp + m0 * K, m1 - m0, K, gs, xqp + m0 * K, xdp + m0 * nb * 8, xsp + m0 * G);
        });
        const uint8_t *cp = codes.data_ptr<uint8_t>();
        const uint16_t *sp = reinterpret_cast<const uint16_t *>(scales.data_ptr<at::Half>());
        const uint16_t *mp = mins ? reinterpret_cast<const uint16_t *>(mins->data_ptr<at::Half>()) : nullptr;
        const uint8_t *zp = zeros ? zeros->data_ptr<uint8_t>() : nullptr;
        const float *bp = bias ? bias->data_ptr<float>() : nullptr;
        float *yp = y.data_ptr<float>();
        at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
            std::vector<float> off(G + nb);
            isa->qgemm(xqp, xdp, xsp, M, cp, sp, mp, zp, bp, yp, N, K, gs, (int)bits, n0, n1, off.data());
        });
    }
    y = y.view(out_shape);
    return x.scalar_type() == at::kFloat ? y : y.to(x.scalar_type());
}

// x [..., K] -> [..., N] in fp32 arithmetic for a weight [N, K] (fp32, bf16 or fp16) read as it is.
at::Tensor hlinear(const at::Tensor &x, const at::Tensor &w, const c10::optional<at::Tensor> &bias) {
    TORCH_CHECK(w.dim() == 2 && (w.scalar_type() == at::kBFloat16 || w.scalar_type() == at::kHalf ||
                                 w.scalar_type() == at::kFloat),
                "telechat::hlinear: the weight must be a 2-d fp32, bf16 or fp16 tensor");
    check_cpu(w, "weight", w.scalar_type());
    const int64_t N = w.size(0), K = w.size(1);
    TORCH_CHECK(x.size(-1) == K, "telechat::hlinear: x has ", x.size(-1), " columns, the weight ", K);
    if (bias) {
        check_cpu(*bias, "bias", at::kFloat);
        TORCH_CHECK(bias->numel() == N, "telechat::hlinear: bias must have ", N, " values");
    }
    const at::Tensor xf = x.reshape({-1, K}).to(at::kFloat).contiguous();
    const int64_t M = xf.size(0);
    auto out_shape = x.sizes().vec();
    out_shape.back() = N;
    at::Tensor y = at::empty({M, N}, xf.options());
    const Isa *isa = active();
    const float *xp = xf.data_ptr<float>(), *bp = bias ? bias->data_ptr<float>() : nullptr;
    const void *wp = w.data_ptr();
    float *yp = y.data_ptr<float>();
    const int wtype = w.scalar_type() == at::kFloat ? 0 : w.scalar_type() == at::kBFloat16 ? 1 : 2;
    at::parallel_for(0, N, 64, [&](int64_t n0, int64_t n1) { isa->dgemm(xp, wp, wtype, bp, yp, M, N, K, n0, n1); });
    y = y.view(out_shape);
    return x.scalar_type() == at::kFloat ? y : y.to(x.scalar_type());
}

}  // namespace

// A fragment: other telechat operators may be defined from Python in the same namespace.
TORCH_LIBRARY_FRAGMENT(telechat, m) {
    m.def("qlinear(Tensor x, Tensor codes, Tensor scales, Tensor? mins, Tensor? zeros, Tensor? bias, int bits, "
          "int group_size) -> Tensor");
    m.def("hlinear(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
    m.def("cpu_isa(str want) -> str", &cpu_isa);  // no tensor argument: one kernel for every backend
}

TORCH_LIBRARY_IMPL(telechat, CPU, m) {
    m.impl("qlinear", &qlinear);
    m.impl("hlinear", &hlinear);
}
