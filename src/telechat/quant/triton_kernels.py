"""GPTQ matmul on CUDA in Triton: y = x @ w.T with w dequantized tile by tile in registers.

The weight stays in QuantLinear's "rows" layout (codes [N, K] as bytes, two 4-bit codes per byte for
int4 in GGML's order within each block of 32 columns; scales and zero points [N, G]), so a call reads 1 byte (int8) or half a byte (int4) per weight
instead of materialising the 16-bit matrix. w = (code - zero) * scale, accumulated in fp32.
Decode rows (M <= 8) take a multiply-reduce GEMV path; more rows take tl.dot.
Runs wherever Triton runs (TRITON_INTERPRET=1 runs it on CPU tensors, which the tests use).
"""
from __future__ import annotations

import functools

import torch
from torch import Tensor


@functools.cache
def available() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:
        return False
    return True


@functools.cache
def _kernel():
    import triton
    import triton.language as tl

    configs = [triton.Config({"BN": bn, "BK": bk}, num_warps=w)
               for bn in (32, 64, 128) for bk in (32, 64, 128) for w in (4,)]

    def prune(configs, named_args, **kwargs):
        gs = kwargs.get("GS", named_args.get("GS"))  # constexprs arrive as keywords
        ok = [c for c in configs if gs % c.kwargs["BK"] == 0]
        return ok or configs[:1]

    @triton.jit
    def gptq_mm(x_ptr, q_ptr, s_ptr, z_ptr, y_ptr, M, N, K, M_BUCKET, sxm, sqn, ssn, sym,
                GS: tl.constexpr, BITS: tl.constexpr, BM: tl.constexpr, DOT: tl.constexpr,
                IEEE: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
        pid_n = tl.program_id(0)
        pid_m = tl.program_id(1)
        rm = pid_m * BM + tl.arange(0, BM)
        rn = pid_n * BN + tl.arange(0, BN)
        rk = tl.arange(0, BK)
        m_ok = rm < M
        n_ok = rn < N
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k0 in range(0, K, BK):
            kk = k0 + rk
            x = tl.load(x_ptr + rm[:, None] * sxm + kk[None, :], mask=m_ok[:, None], other=0.0)
            if BITS == 8:
                q = tl.load(q_ptr + rn[None, :] * sqn + kk[:, None], mask=n_ok[None, :], other=0)
            else:
                # per block of 32 columns: 16 bytes, low nibbles columns 0..15, high nibbles 16..31
                byte = tl.load(q_ptr + rn[None, :] * sqn + ((kk // 32) * 16 + kk % 16)[:, None], mask=n_ok[None, :],
                               other=0)
                q = (byte >> ((kk % 32) // 16 * 4)[:, None]) & 15
            g = k0 // GS  # BK divides GS: one group per tile
            s = tl.load(s_ptr + rn * ssn + g, mask=n_ok, other=0.0).to(tl.float32)
            z = tl.load(z_ptr + rn * ssn + g, mask=n_ok, other=0).to(tl.float32)
            w = (q.to(tl.float32) - z[None, :]) * s[None, :]  # [BK, BN]
            if DOT:
                if IEEE:
                    acc += tl.dot(x.to(tl.float32), w, input_precision="ieee")
                else:
                    acc += tl.dot(x, w.to(x.dtype))
            else:
                acc += tl.sum(x.to(tl.float32)[:, :, None] * w[None, :, :], axis=1)
        out = y_ptr + rm[:, None] * sym + rn[None, :]
        tl.store(out, acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])

    tuned = triton.autotune(configs=configs, key=["M_BUCKET", "N", "K"],
                            prune_configs_by={"early_config_prune": prune})(gptq_mm)
    return triton, gptq_mm, tuned


def supports(bits: int, in_features: int, group_size: int) -> bool:
    return bits in (4, 8) and group_size % 32 == 0 and in_features % group_size == 0


@torch.library.custom_op("telechat::gptq_mm_triton", mutates_args=())
def gptq_mm(x: Tensor, qrows: Tensor, srows: Tensor, zrows: Tensor, bits: int, group_size: int) -> Tensor:
    """x [M, K] (fp16, bf16 or fp32; columns in group order) times the quantized weight: [M, N] in x.dtype.
    An operator, so a compiled (CUDA-graph) decode step holds it as one opaque call."""
    triton, plain, tuned = _kernel()
    M, K = x.shape
    N = qrows.shape[0]
    x = x.contiguous()
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    gemv = M <= 8
    BM = 1 if gemv else (16 if M <= 16 else 32 if M <= 32 else 64)
    bucket = M if gemv else BM

    def grid(meta):
        return triton.cdiv(N, meta["BN"]), triton.cdiv(M, BM)

    args = (x, qrows, srows, zrows, y, M, N, K, bucket, x.stride(0), qrows.stride(0), srows.stride(0), y.stride(0))
    kw = dict(GS=group_size, BITS=bits, BM=BM, DOT=not gemv, IEEE=x.dtype == torch.float32)
    if x.is_cuda:
        tuned[grid](*args, **kw)
    else:  # Triton's interpreter (TRITON_INTERPRET=1): one fixed tile, nothing to time
        plain[grid](*args, **kw, BN=32, BK=32)
    return y


@gptq_mm.register_fake
def _(x, qrows, srows, zrows, bits, group_size):
    return x.new_empty(x.shape[0], qrows.shape[0])
