// torch.classes.telechat.DecodeStack: a TeleChat decoder's blocks for a batch of decode rows (one new token
// each) in one call, for CPU decoding: norms, projections (int4/int8 codes through the integer kernels, or
// fp32/bf16/fp16 weights), rotary, the paged KV write, attention and the MLP, without returning to Python
// between them. The model's weights are registered once (add_layer / add_linear); `step` takes the hidden
// states, the rotary tables and the paged cache of that step (see telechat/native.py).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>
#include <torch/custom_class.h>
#include <torch/library.h>

#include <omp.h>

#include <sched.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <string>
#include <vector>

#include "isa.h"

namespace {

int element_type(const at::Tensor &t) {  // as the kernels number them
    if (t.scalar_type() == at::kFloat) return 0;
    if (t.scalar_type() == at::kBFloat16) return 1;
    if (t.scalar_type() == at::kHalf) return 2;
    TORCH_CHECK(false, "telechat.DecodeStack: expected a fp32, bf16 or fp16 tensor, got ", t.scalar_type());
    return -1;
}

void need(const at::Tensor &t, const char *what, at::ScalarType dtype, int64_t numel) {
    TORCH_CHECK(t.device().is_cpu() && t.is_contiguous(), "telechat.DecodeStack: ", what,
                " must be a contiguous CPU tensor");
    TORCH_CHECK(t.scalar_type() == dtype, "telechat.DecodeStack: ", what, " must be ", dtype, ", got ",
                t.scalar_type());
    TORCH_CHECK(numel < 0 || t.numel() == numel, "telechat.DecodeStack: ", what, " must have ", numel,
                " elements, got ", t.sizes());
}

struct Linear {  // y [M, N] = x [M, K] W^T + bias
    bool quant = false;
    at::Tensor codes, scales, mins, zeros, weight, bias;  // bias fp32 (or undefined)
    int64_t bits = 0, gs = 0, N = 0, K = 0;
    int wtype = 0;
};

struct Layer {
    at::Tensor ln1, ln2;              // fp32
    std::vector<Linear> attn_in, mlp_in;  // [query+key_value stacked] or [query, key_value]; [gate+up] or [gate, up]
    std::vector<Linear> dense, down;
};

// Threads of one parallel region wait for each other here by spinning. libgomp's own barrier puts the
// threads to sleep almost at once when it counts more threads than CPUs (as soon as a second thread
// has run a parallel region, e.g. the engine thread besides the main one), and a wake-up per barrier
// then costs more than the work between two barriers of a small model.
class SpinBarrier {
   public:
    void reset(int n) { n_ = n; }
    void wait() {
        const int gen = gen_.load(std::memory_order_acquire);
        if (count_.fetch_add(1, std::memory_order_acq_rel) == n_ - 1) {
            count_.store(0, std::memory_order_relaxed);
            gen_.fetch_add(1, std::memory_order_release);
            return;
        }
        for (long spins = 0; gen_.load(std::memory_order_acquire) == gen; spins++) {
            if (spins < (1 << 16)) {
#if defined(__x86_64__) || defined(__i386__)
                __builtin_ia32_pause();
#endif
            } else {
                sched_yield();  // another process holds the core: give it up
            }
        }
    }

   private:
    int n_ = 1;
    std::atomic<int> count_{0}, gen_{0};
};

class DecodeStack : public torch::CustomClassHolder {
   public:
    DecodeStack(int64_t hidden, int64_t n_head, int64_t n_kv, int64_t head_dim, int64_t ffn, double eps)
        : H_(hidden), nh_(n_head), nkv_(n_kv), d_(head_dim), F_(ffn), eps_(eps) {
        TORCH_CHECK(hidden > 0 && n_head > 0 && n_kv > 0 && head_dim > 0 && head_dim % 2 == 0 && ffn > 0 &&
                        n_head % n_kv == 0 && head_dim <= 512,
                    "telechat.DecodeStack: bad shape (hidden ", hidden, ", heads ", n_head, ", kv heads ", n_kv,
                    ", head_dim ", head_dim, ", ffn ", ffn, ")");
    }

    void add_layer(const at::Tensor &ln1, const at::Tensor &ln2) {
        Layer l;
        l.ln1 = ln1.to(at::kFloat).contiguous();
        l.ln2 = ln2.to(at::kFloat).contiguous();
        need(l.ln1, "ln1", at::kFloat, H_);
        need(l.ln2, "ln2", at::kFloat, H_);
        layers_.push_back(std::move(l));
    }

    // part: "attn_in" (query and key_value, in that order, or their stack), "dense", "mlp_in" (gate then up,
    // or their stack), "down". Quantized: codes/scales/(mins|zeros) in the rows layout of telechat::qlinear;
    // else weight [N, K].
    void add_linear(const std::string &part, const c10::optional<at::Tensor> &codes,
                    const c10::optional<at::Tensor> &scales, const c10::optional<at::Tensor> &mins,
                    const c10::optional<at::Tensor> &zeros, const c10::optional<at::Tensor> &weight,
                    const c10::optional<at::Tensor> &bias, int64_t bits, int64_t group_size) {
        TORCH_CHECK(!layers_.empty(), "telechat.DecodeStack: add_layer before add_linear");
        Layer &l = layers_.back();
        std::vector<Linear> *into = part == "attn_in" ? &l.attn_in : part == "dense" ? &l.dense
                                    : part == "mlp_in" ? &l.mlp_in : part == "down" ? &l.down : nullptr;
        TORCH_CHECK(into, "telechat.DecodeStack: unknown part '", part, "'");
        Linear L;
        if (codes) {
            TORCH_CHECK(bits == 4 || bits == 8, "telechat.DecodeStack: bits must be 4 or 8, got ", bits);
            TORCH_CHECK(scales && (mins.has_value() != zeros.has_value()),
                        "telechat.DecodeStack: quantized layers need scales and exactly one of mins and zeros");
            L.quant = true;
            L.bits = bits;
            L.gs = group_size;
            L.N = codes->size(0);
            L.K = codes->size(1) * 8 / bits;
            TORCH_CHECK(L.K % 32 == 0 && L.gs % 32 == 0 && L.gs > 0 && L.K % L.gs == 0,
                        "telechat.DecodeStack: in_features and group_size must be multiples of 32");
            const int64_t G = L.K / L.gs;
            need(*codes, "codes", at::kByte, -1);
            need(*scales, "scales", at::kHalf, L.N * G);
            if (mins) need(*mins, "mins", at::kHalf, L.N * G);
            if (zeros) need(*zeros, "zeros", at::kByte, L.N * G);
            L.codes = *codes;
            L.scales = *scales;
            if (mins) L.mins = *mins;
            if (zeros) L.zeros = *zeros;
        } else {
            TORCH_CHECK(weight && weight->dim() == 2, "telechat.DecodeStack: a layer needs codes or a 2-d weight");
            L.weight = weight->contiguous();
            L.wtype = element_type(L.weight);
            TORCH_CHECK(L.weight.device().is_cpu(), "telechat.DecodeStack: weights must be on the CPU");
            L.N = L.weight.size(0);
            L.K = L.weight.size(1);
        }
        if (bias) {
            L.bias = bias->to(at::kFloat).contiguous();
            need(L.bias, "bias", at::kFloat, L.N);
        }
        into->push_back(std::move(L));
    }

    int64_t num_layers() const { return (int64_t)layers_.size(); }

    // h [B, hidden] fp32 (updated in place and returned); cos/sin [B, head_dim] fp32; k/v: per layer the
    // pool [slots, n_kv, head_dim]; write_slots [B]; ctx_slots [B, S] with the first ctx_lens[b] entries of
    // row b the slots of its positions 0..len-1, the last being write_slots[b].
    at::Tensor step(at::Tensor h, const at::Tensor &cos, const at::Tensor &sin, const std::vector<at::Tensor> &k,
                    const std::vector<at::Tensor> &v, const at::Tensor &write_slots, const at::Tensor &ctx_slots,
                    const at::Tensor &ctx_lens) {
        check_complete();
        const int64_t B = h.size(0), nL = (int64_t)layers_.size(), d = d_;
        need(h, "h", at::kFloat, B * H_);
        need(cos, "cos", at::kFloat, B * d);
        need(sin, "sin", at::kFloat, B * d);
        need(write_slots, "write_slots", at::kLong, B);
        need(ctx_lens, "ctx_lens", at::kLong, B);
        need(ctx_slots, "ctx_slots", at::kLong, -1);
        TORCH_CHECK(ctx_slots.dim() == 2 && ctx_slots.size(0) == B, "telechat.DecodeStack: ctx_slots must be [", B,
                    ", S]");
        TORCH_CHECK((int64_t)k.size() == nL && (int64_t)v.size() == nL, "telechat.DecodeStack: ", nL,
                    " key and value pools expected");
        const int kvtype = element_type(k[0]);
        const int64_t slots = k[0].size(0), S = ctx_slots.size(1);
        for (int64_t l = 0; l < nL; l++)
            for (const at::Tensor *t : {&k[l], &v[l]}) {
                need(*t, "a KV pool", k[0].scalar_type(), -1);
                TORCH_CHECK(t->dim() == 3 && t->size(0) == slots && t->size(1) == nkv_ && t->size(2) == d,
                            "telechat.DecodeStack: KV pools must be [", slots, ", ", nkv_, ", ", d, "], got ",
                            t->sizes());
            }
        const int64_t *ws = write_slots.data_ptr<int64_t>(), *cs = ctx_slots.data_ptr<int64_t>(),
                      *cl = ctx_lens.data_ptr<int64_t>();
        for (int64_t b = 0; b < B; b++) {  // every slot read or written is inside the pools
            TORCH_CHECK(ws[b] >= 0 && ws[b] < slots && cl[b] >= 1 && cl[b] <= S,
                        "telechat.DecodeStack: row ", b, " has a write slot or context length out of range");
            for (int64_t s = 0; s < cl[b]; s++)
                TORCH_CHECK(cs[b * S + s] >= 0 && cs[b * S + s] < slots, "telechat.DecodeStack: context slot out of range");
        }
        isa_ = telechat::active_isa();
        const float *cp = cos.data_ptr<float>(), *sp = sin.data_ptr<float>();
        float *hp = h.data_ptr<float>();
        const int64_t nq = nh_ * d, group = nh_ / nkv_, es = kvtype == 0 ? 4 : 2;
        const float scale = 1.f / std::sqrt((float)d);
        size_t widest = 0;
        for (const Layer &L : layers_)
            for (const auto *part : {&L.attn_in, &L.mlp_in}) {
                size_t n = 0;
                for (const Linear &x : *part) n += x.N;
                widest = std::max(widest, n);
            }
        x_.resize(B * std::max(H_, F_));
        att_.resize(B * nq);
        y_.resize(B * widest);
        scores_.resize(B * nh_ * S);
        cost_.assign(B * nh_ + 1, 0);  // cost_[i]: the attention work of items before i
        for (int64_t i = 0; i < B * nh_; i++) cost_[i + 1] = cost_[i] + cl[i / nh_] + 16;
        // One parallel region for the whole step (a fork/join per projection costs more than the
        // projection on small models): each thread takes its share of every projection's outputs and of
        // the attention heads; the small row-wise steps run on one thread between barriers.
        const int threads = std::max(1, at::get_num_threads());
#pragma omp parallel num_threads(threads)
        {
            const int tid = omp_get_thread_num(), nt = omp_get_num_threads();
#pragma omp single
            barrier_.reset(nt);
            for (int64_t l = 0; l < nL; l++) {
                const Layer &L = layers_[l];
                char *kp = (char *)k[l].data_ptr(), *vp = (char *)v[l].data_ptr();
                if (tid == 0) {
                    rms_norm(hp, L.ln1.data_ptr<float>(), B, x_.data());
                    prepare(L.attn_in, x_.data(), B);
                }
                barrier_.wait();
                project(L.attn_in, x_.data(), B, tid, nt);
                barrier_.wait();
                if (tid == 0)
                for (int64_t b = 0; b < B; b++) {  // rotary keys and values into the pool
                    const float *kv = y_.data() + b * (nq + 2 * nkv_ * d) + nq;
                    float kr[512];
                    for (int64_t j = 0; j < nkv_; j++) {
                        rope(kv + j * 2 * d, cp + b * d, sp + b * d, kr);
                        const int64_t at = (ws[b] * nkv_ + j) * d;
                        store(kp + at * es, kr, d, kvtype);
                        store(vp + at * es, kv + j * 2 * d + d, d, kvtype);
                    }
                }
                barrier_.wait();
                {
                    float qr[512];
                    // Items split by their context lengths (a prompt chunk's rows at a long context cost
                    // far more than decode rows), not by count.
                    const int64_t total = cost_.back();
                    const int64_t i0 = std::lower_bound(cost_.begin(), cost_.end(), total * tid / nt) - cost_.begin(),
                                  i1 = tid + 1 == nt ? B * nh_
                                                     : std::lower_bound(cost_.begin(), cost_.end(),
                                                                        total * (tid + 1) / nt) - cost_.begin();
                    for (int64_t i = i0; i < i1; i++) {
                        const int64_t b = i / nh_, hh = i % nh_, j = hh / group;
                        rope(y_.data() + b * (nq + 2 * nkv_ * d) + hh * d, cp + b * d, sp + b * d, qr);
                        isa_->attend(qr, kp + j * d * es, vp + j * d * es, kvtype, nkv_ * d, cs + b * S, cl[b], d,
                                     scale, att_.data() + b * nq + hh * d, scores_.data() + i * S);
                    }
                }
                barrier_.wait();
                if (tid == 0) prepare(L.dense, att_.data(), B);
                barrier_.wait();
                project(L.dense, att_.data(), B, tid, nt);
                barrier_.wait();
                if (tid == 0) {
                    add_into(hp, B);
                    rms_norm(hp, L.ln2.data_ptr<float>(), B, x_.data());
                    prepare(L.mlp_in, x_.data(), B);
                }
                barrier_.wait();
                project(L.mlp_in, x_.data(), B, tid, nt);
                barrier_.wait();
                {  // SwiGLU, each thread its share of the B x F products
                    const int64_t n = B * F_, i0 = n * tid / nt, i1 = n * (tid + 1) / nt;
                    for (int64_t i = i0; i < i1; i++) {
                        const int64_t b = i / F_, c = i % F_;
                        const float g = y_[b * 2 * F_ + c], u = y_[b * 2 * F_ + F_ + c];
                        x_[i] = g / (1.f + std::exp(-g)) * u;
                    }
                }
                barrier_.wait();
                if (tid == 0) prepare(L.down, x_.data(), B);
                barrier_.wait();
                project(L.down, x_.data(), B, tid, nt);
                barrier_.wait();
                if (tid == 0) add_into(hp, B);
                barrier_.wait();
            }
        }
        return h;
    }

   private:
    int64_t H_, nh_, nkv_, d_, F_;
    double eps_;
    std::vector<Layer> layers_;
    bool complete_ = false;
    const telechat::Isa *isa_ = nullptr;
    SpinBarrier barrier_;
    std::vector<float> x_, att_, y_, scores_;
    std::vector<int64_t> cost_;
    // The current projection's input rounded to int8 (one set per part: parts may differ in group size).
    std::vector<std::vector<int8_t>> xq_{2};
    std::vector<std::vector<float>> xd_{2}, xs_{2};

    void check_complete() {
        if (complete_) return;
        TORCH_CHECK(!layers_.empty(), "telechat.DecodeStack: no layers");
        const int64_t nq = nh_ * d_, nkv = 2 * nkv_ * d_;
        for (const Layer &L : layers_) {
            auto check = [](const std::vector<Linear> &part, int64_t K, int64_t N, const char *name) {
                int64_t n = 0;
                for (const Linear &x : part) {
                    TORCH_CHECK(x.K == K, "telechat.DecodeStack: ", name, " takes ", K, " inputs, got ", x.K);
                    n += x.N;
                }
                TORCH_CHECK(!part.empty() && n == N, "telechat.DecodeStack: ", name, " must give ", N, " outputs, got ",
                            n);
            };
            check(L.attn_in, H_, nq + nkv, "attn_in");
            check(L.dense, nq, H_, "dense");
            check(L.mlp_in, H_, 2 * F_, "mlp_in");
            check(L.down, F_, H_, "down");
            TORCH_CHECK(L.attn_in.size() <= 2 && L.mlp_in.size() <= 2 && L.dense.size() == 1 && L.down.size() == 1,
                        "telechat.DecodeStack: at most two parts per projection");
        }
        complete_ = true;
    }

    void rms_norm(const float *h, const float *w, int64_t B, float *x) const {
        for (int64_t b = 0; b < B; b++) {
            const float *hb = h + b * H_;
            double ss = 0.0;
            for (int64_t i = 0; i < H_; i++) ss += (double)hb[i] * hb[i];
            const float r = 1.f / std::sqrt((float)(ss / H_) + (float)eps_);
            for (int64_t i = 0; i < H_; i++) x[b * H_ + i] = hb[i] * r * w[i];
        }
    }

    void rope(const float *x, const float *c, const float *s, float *out) const {
        const int64_t half = d_ / 2;
        for (int64_t i = 0; i < half; i++) out[i] = x[i] * c[i] - x[i + half] * s[i];
        for (int64_t i = half; i < d_; i++) out[i] = x[i] * c[i] + x[i - half] * s[i];
    }

    static void store(char *dst, const float *src, int64_t n, int type) {
        if (type == 0) {
            std::copy(src, src + n, (float *)dst);
        } else if (type == 1) {
            for (int64_t i = 0; i < n; i++) ((c10::BFloat16 *)dst)[i] = c10::BFloat16(src[i]);
        } else {
            for (int64_t i = 0; i < n; i++) ((c10::Half *)dst)[i] = c10::Half(src[i]);
        }
    }

    // Column `col` of row b of the concatenated outputs of a projection's parts.
    // h += y_[:, :hidden] (a projection to the hidden size).
    void add_into(float *h, int64_t B) const {
        for (int64_t b = 0; b < B; b++)
            for (int64_t i = 0; i < H_; i++) h[b * H_ + i] += y_[b * H_ + i];
    }

    // Round the input of a projection's quantized parts to int8 (on one thread, before `project`).
    void prepare(const std::vector<Linear> &parts, const float *x, int64_t M) {
        for (size_t p = 0; p < parts.size(); p++) {
            const Linear &L = parts[p];
            if (!L.quant) continue;
            const int64_t K = L.K, nb = K / 32, G = K / L.gs;
            xq_[p].resize(M * K);
            xd_[p].resize(M * nb * 8);
            xs_[p].resize(M * G);
            isa_->quantize(x, M, K, L.gs, xq_[p].data(), xd_[p].data(), xs_[p].data());
        }
    }

    // This thread's share of y_ = x W^T for the parts side by side ([M, sum N]); y_'s columns are split
    // evenly across the threads, in runs of 16.
    void project(const std::vector<Linear> &parts, const float *x, int64_t M, int tid, int nt) {
        int64_t total = 0;
        for (const Linear &L : parts) total += L.N;
        const int64_t units = (total + 15) / 16, c0 = std::min(total, units * tid / nt * 16),
                      c1 = std::min(total, units * (tid + 1) / nt * 16);
        int64_t col = 0;
        for (size_t p = 0; p < parts.size(); p++) {
            const Linear &L = parts[p];
            const int64_t n0 = std::max<int64_t>(c0 - col, 0), n1 = std::min<int64_t>(c1 - col, L.N);
            if (n0 < n1) run(L, p, x, M, n0, n1, y_.data() + col, total);
            col += L.N;
        }
    }

    // Outputs n0..n1 of one part into y (row stride ld).
    void run(const Linear &L, size_t p, const float *x, int64_t M, int64_t n0, int64_t n1, float *y, int64_t ld) {
        const float *bias = L.bias.defined() ? L.bias.data_ptr<float>() : nullptr;
        if (!L.quant) {
            isa_->dgemm(x, L.weight.data_ptr(), L.wtype, bias, y, M, ld, L.K, n0, n1);
            return;
        }
        const int64_t nb = L.K / 32, G = L.K / L.gs;
        thread_local std::vector<float> off;
        off.resize(G + nb);
        const uint16_t *mp = L.mins.defined() ? reinterpret_cast<const uint16_t *>(L.mins.data_ptr<at::Half>()) : nullptr;
        isa_->qgemm(xq_[p].data(), xd_[p].data(), xs_[p].data(), M, L.codes.data_ptr<uint8_t>(),
                    reinterpret_cast<const uint16_t *>(L.scales.data_ptr<at::Half>()), mp,
                    L.zeros.defined() ? L.zeros.data_ptr<uint8_t>() : nullptr, bias, y, ld, L.K, L.gs, (int)L.bits,
                    n0, n1, off.data());
    }
};

}  // namespace

TORCH_LIBRARY_FRAGMENT(telechat, m) {
    m.class_<DecodeStack>("DecodeStack")
        .def(torch::init<int64_t, int64_t, int64_t, int64_t, int64_t, double>())
        .def("add_layer", &DecodeStack::add_layer)
        .def("add_linear", &DecodeStack::add_linear)
        .def("num_layers", &DecodeStack::num_layers)
        .def("step", &DecodeStack::step);
}
