"""Pre-training and SFT on prepared data: one loop, deterministic, resumable bit for bit.

The data order is a function of (seed, step) alone and every checkpoint holds the weights (an
official-layout folder `telechat.load` reads), the optimizer, the schedule and the RNG states, so
`resume=True` continues exactly where an uninterrupted run would be.
"""
from __future__ import annotations

import json
import math
import os
import random
import resource
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from ..checkpoint import load_model
from ..data.prepare import load_prepared
from ..llm import LLM, default_generation_config, from_preset, load
from ..model import causal_lm_loss, packed_labels
from ..tokenizer import load_tokenizer


@dataclass
class TrainConfig:
    stage: Literal["pretrain", "sft"]
    data: str
    output: str
    model: str | None = None
    preset: str | None = None
    max_seq_len: int | None = None
    per_device_batch_size: int = 4
    gradient_accumulation_steps: int = 1
    learning_rate: float = 3e-4
    weight_decay: float = 0.0
    warmup_proportion: float = 0.0
    lr_scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    num_train_epochs: float = 1.0
    max_steps: int | None = None
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    zero_stage: int | None = None  # None: plain PyTorch (unless launched by DeepSpeed's launcher)
    offload: bool = False
    gradient_checkpointing: bool = False
    save_steps: int = 0
    eval_steps: int = 0
    eval_fraction: float = 0.02  # sft: share of samples held out (pretrain uses the val/ split)
    seed: int = 0
    resume: bool = False
    device: str = "cpu"
    log_every: int = 1
    progress: bool = True
    tensorboard: bool = False
    extra: dict = field(default_factory=dict)

    def check(self) -> None:
        if (self.model is None) == (self.preset is None):
            raise ValueError("give exactly one of --model PATH and --preset NAME")
        for name in ("per_device_batch_size", "gradient_accumulation_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.warmup_proportion < 1:
            raise ValueError(f"warmup_proportion must be in [0, 1), got {self.warmup_proportion}")
        if self.precision == "fp16" and self.device == "cpu":
            raise ValueError("fp16 training needs a GPU; use --precision bf16 or fp32 on CPU")
        if self.zero_stage is not None and self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"zero_stage must be 0, 1, 2 or 3, got {self.zero_stage}")
        if self.offload and self.zero_stage not in (2, 3):
            raise ValueError("--offload needs --zero-stage 2 or 3")


# ---- data --------------------------------------------------------------------------------------
class Batches:
    """Deterministic batches over a prepared dataset: sample order = permutation(seed, epoch)."""

    def __init__(self, arrays: dict, rows: np.ndarray, batch_size: int, seed: int):
        self.arrays, self.rows, self.batch_size, self.seed = arrays, rows, batch_size, seed
        self._orders: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.rows)

    def order(self, epoch: int) -> np.ndarray:
        if epoch not in self._orders:
            self._orders = {epoch: self.rows[np.random.default_rng([self.seed, epoch]).permutation(len(self.rows))]}
        return self._orders[epoch]

    def batch(self, index: int) -> dict[str, torch.Tensor]:
        """The `index`-th batch of the endless stream (epoch after epoch)."""
        start, n = index * self.batch_size, len(self.rows)
        picks = [self.order((start + i) // n)[(start + i) % n] for i in range(self.batch_size)]
        return self.take(picks)

    def take(self, picks) -> dict[str, torch.Tensor]:
        picks = np.asarray(picks)
        out = {"input_ids": torch.from_numpy(np.asarray(self.arrays["input_ids"][picks], np.int64))}
        for name in ("loss_mask", "segment_ids"):
            if name in self.arrays:
                out[name] = torch.from_numpy(np.asarray(self.arrays[name][picks], np.int64))
        return out


def _datasets(cfg: TrainConfig) -> tuple[Batches, Batches | None, dict]:
    mf = Path(cfg.data) / "manifest.json"
    mode = json.loads(mf.read_text(encoding="utf-8")).get("mode") if mf.exists() else None
    if mode is not None and mode != cfg.stage:
        raise ValueError(f"{cfg.data}: prepared with --mode {mode}, not {cfg.stage}")
    if cfg.stage == "sft":
        arrays = load_prepared(cfg.data)
        if arrays["manifest"]["mode"] != "sft":
            raise ValueError(f"{cfg.data}: prepared with --mode {arrays['manifest']['mode']}, not sft")
        n = len(arrays["input_ids"])
        rows = np.random.default_rng([cfg.seed, 99]).permutation(n)
        n_val = int(round(n * cfg.eval_fraction)) if n > 1 else 0
        train = Batches(arrays, np.sort(rows[n_val:]), cfg.per_device_batch_size, cfg.seed)
        val = Batches(arrays, np.sort(rows[:n_val]), cfg.per_device_batch_size, cfg.seed) if n_val else None
        manifest = arrays["manifest"]
    else:
        arrays = load_prepared(cfg.data, "train")
        if arrays["manifest"]["mode"] != "pretrain":
            raise ValueError(f"{cfg.data}: prepared with --mode {arrays['manifest']['mode']}, not pretrain")
        train = Batches(arrays, np.arange(len(arrays["input_ids"])), cfg.per_device_batch_size, cfg.seed)
        val_arrays = load_prepared(cfg.data, "val")
        val = Batches(val_arrays, np.arange(len(val_arrays["input_ids"])), cfg.per_device_batch_size, cfg.seed) \
            if len(val_arrays["input_ids"]) else None
        manifest = arrays["manifest"]
    seq = manifest["max_seq_len"]
    if cfg.max_seq_len is not None and cfg.max_seq_len != seq:
        raise ValueError(f"{cfg.data} was prepared with max_seq_len {seq}, not {cfg.max_seq_len}: prepare it again")
    if len(train) == 0:
        raise ValueError(f"{cfg.data}: no training samples")
    return train, val, manifest


# ---- model, optimizer, schedule ----------------------------------------------------------------
def _build(cfg: TrainConfig, manifest: dict, data: Batches) -> LLM:
    tok_path = manifest.get("tokenizer")
    tokenizer = load_tokenizer(tok_path) if tok_path and Path(tok_path).exists() else None
    if cfg.model is not None:
        llm = load(cfg.model, device=cfg.device, dtype=torch.float32)
        if llm.tokenizer is None:
            llm.tokenizer = tokenizer
    else:
        over = {}
        if tokenizer is not None:  # the embedding must cover the data's vocabulary
            over["vocab_size"] = -(-len(tokenizer) // 64) * 64
            over.update({k: getattr(tokenizer, a) for k, a in (("pad_token_id", "pad_id"), ("eos_token_id", "eos_id"),
                                                                ("bos_token_id", "bos_id")) if getattr(tokenizer, a) is not None})
        over["seq_length"] = max(manifest["max_seq_len"], 32)
        llm = from_preset(cfg.preset, device=cfg.device, seed=cfg.seed, tokenizer=tokenizer, **over)
        llm.generation_config = default_generation_config(llm.config, tokenizer)
    top = int(np.max(np.asarray(data.arrays["input_ids"][:256])))
    if top >= llm.config.vocab_size:
        raise ValueError(f"{cfg.data} has token id {top}, beyond the model's vocab_size {llm.config.vocab_size}: "
                         "the data was tokenized with another tokenizer")
    return llm


def _optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    decay = [p for n, p in model.named_parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.requires_grad and p.dim() < 2]  # biases, norms
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(0.9, 0.95), eps=1e-5)


def lr_factor(step: int, total: int, warmup: int, kind: str) -> float:
    """Linear warmup, then cosine / linear decay to zero, or constant."""
    if step < warmup:
        return (step + 1) / warmup
    if kind == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress))) if kind == "cosine" else max(0.0, 1 - progress)


# ---- checkpoints -------------------------------------------------------------------------------
def _save(out: Path, step: int, llm: LLM, runner: _Plain, cfg: TrainConfig, history: list[dict]) -> Path:
    """checkpoint-STEP/: the model folder plus the optimizer/RNG state, renamed into place when complete
    (a crash while saving leaves the previous checkpoint as `latest`)."""
    final = out / f"checkpoint-{step:07d}"
    tmp = out / f".{final.name}.tmp"
    if runner.rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    runner.barrier()
    with runner.gathered():
        if runner.rank == 0:
            llm.save(tmp)
    runner.barrier()
    extra = runner.save_state(tmp)  # collective under DeepSpeed
    runner.barrier()
    if runner.rank == 0:
        state = {"step": step, "config": asdict(cfg), "history": history, **extra,
                 "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}}
        torch.save(state, tmp / "trainer_state.pt")
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        (out / "latest.tmp").write_text(final.name)
        os.replace(out / "latest.tmp", out / "latest")
    runner.barrier()
    return final


def latest_checkpoint(out: Path) -> Path | None:
    f = Path(out) / "latest"
    if not f.exists():
        return None
    path = Path(out) / f.read_text().strip()
    return path if (path / "trainer_state.pt").exists() else None


# ---- plain PyTorch or DeepSpeed, behind one face ----------------------------------------------------
class _Plain:
    rank, world = 0, 1

    def __init__(self, model, opt, sched, cfg: TrainConfig):
        self.model, self.opt, self.sched, self.accum = model, opt, sched, cfg.gradient_accumulation_steps

    def backward(self, loss):
        (loss / self.accum).backward()

    def micro_step(self):
        pass

    def step(self) -> float:
        norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0))
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        return norm

    def lr(self) -> float:
        return self.sched.get_last_lr()[0]

    def mean(self, x: float) -> float:
        return x

    def gathered(self):
        import contextlib
        return contextlib.nullcontext()

    def save_state(self, folder: Path) -> dict:
        return {"optimizer": self.opt.state_dict()}

    def load_state(self, folder: Path, state: dict, start: int) -> None:
        fresh = load_model(folder, device=next(self.model.parameters()).device, dtype=torch.float32)
        self.model.load_state_dict(fresh.state_dict())
        self.opt.load_state_dict(state["optimizer"])
        for _ in range(start):
            self.sched.step()

    def barrier(self):
        pass


class _DeepSpeed(_Plain):
    """DeepSpeed's engine (ZeRO 0-3, optional CPU offload); on CPU it runs with the gloo backend."""

    def __init__(self, model, opt, sched, cfg: TrainConfig):
        if cfg.device == "cpu":
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        try:
            import deepspeed
        except ImportError:
            raise ValueError("DeepSpeed is not installed: pip install deepspeed (or train without --zero-stage/--nproc)") \
                from None
        import torch.distributed as dist

        self.dist = dist
        deepspeed.init_distributed(dist_backend="gloo" if cfg.device == "cpu" else "nccl")
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        zero = {"stage": cfg.zero_stage or 0}
        if cfg.offload:
            zero["offload_optimizer"] = {"device": "cpu"}
            if cfg.zero_stage == 3:
                zero["offload_param"] = {"device": "cpu"}
        ds_config = {"train_micro_batch_size_per_gpu": cfg.per_device_batch_size,
                     "gradient_accumulation_steps": cfg.gradient_accumulation_steps, "gradient_clipping": 1.0,
                     "zero_optimization": zero, "zero_force_ds_cpu_optimizer": False,
                     "bf16": {"enabled": cfg.precision == "bf16"}, "fp16": {"enabled": cfg.precision == "fp16"},
                     "steps_per_print": 10**9, "wall_clock_breakdown": False}
        self.engine, self.opt, _, self.sched = deepspeed.initialize(model=model, optimizer=opt, lr_scheduler=sched,
                                                                    config=ds_config)
        self.model = self.engine
        self.deepspeed = deepspeed
        self.zero3 = cfg.zero_stage == 3

    def backward(self, loss):
        self.engine.backward(loss)

    def micro_step(self):
        self.engine.step()  # applies the update at the accumulation boundary only

    def step(self) -> float:
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    def lr(self) -> float:
        return self.engine.get_lr()[0]

    def mean(self, x: float) -> float:
        t = torch.tensor([x], dtype=torch.float64)
        self.dist.all_reduce(t)
        return float(t) / self.world

    def gathered(self):
        if self.zero3:  # full weights on every rank for the duration (to save them)
            return self.deepspeed.zero.GatheredParameters(list(self.engine.module.parameters()), modifier_rank=None)
        return super().gathered()

    def save_state(self, folder: Path) -> dict:
        self.engine.save_checkpoint(str(folder / "deepspeed"), tag="state")
        return {}

    def load_state(self, folder: Path, state: dict, start: int) -> None:
        self.engine.load_checkpoint(str(folder / "deepspeed"), tag="state")

    def barrier(self):
        self.dist.barrier()


def measured_matmul_flops(device: str = "cpu", dtype=torch.float32, seconds: float = 0.3) -> float:
    """The matmul rate this device reaches (FLOP/s), the denominator of the MFU estimate."""
    n = 1024
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    a @ b  # warm-up
    runs, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        runs += 1
    if device != "cpu" and torch.cuda.is_available():
        torch.cuda.synchronize()
    return 2 * n**3 * runs / (time.perf_counter() - t0)


def _world() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


# ---- the loop ----------------------------------------------------------------------------------
def _loss(model, batch: dict, stage: str, precision: str, device: str) -> tuple[torch.Tensor, int]:
    ids = batch["input_ids"].to(device)
    # SFT dialogues attend only within themselves; pre-training blocks are plain causal text (documents
    # separated by <_end>), as in the usual GPT-style recipe and cheaper (no explicit mask).
    seg = batch.get("segment_ids") if stage == "sft" else None
    seg = seg.to(device) if seg is not None else None
    mask = batch.get("loss_mask") if stage == "sft" else None
    labels = packed_labels(ids, mask.to(device) if mask is not None else None, seg)
    with torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16, enabled=precision == "bf16"):
        logits = model(ids, segment_ids=seg)
    return causal_lm_loss(logits, labels), int((labels[:, 1:] != -100).sum())


@torch.no_grad()
def evaluate(model, val: Batches, cfg: TrainConfig) -> dict:
    model.eval()
    total, tokens = 0.0, 0
    for i in range(0, len(val), val.batch_size):
        batch = val.take(val.rows[i:i + val.batch_size])
        loss, n = _loss(model, batch, cfg.stage, cfg.precision, cfg.device)
        total, tokens = total + float(loss) * n, tokens + n
    model.train()
    mean = total / max(tokens, 1)
    return {"val_loss": mean, "val_ppl": math.exp(min(mean, 50))}


def train(cfg: TrainConfig) -> dict:
    """Run (or resume) training; returns a summary with the per-step history."""
    cfg.check()
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    train_data, val, manifest = _datasets(cfg)
    torch.manual_seed(cfg.seed)
    llm = _build(cfg, manifest, train_data)
    model = llm.model.train()
    model.transformer.gradient_checkpointing = cfg.gradient_checkpointing
    opt = _optimizer(model, cfg)
    per_step = cfg.per_device_batch_size * cfg.gradient_accumulation_steps
    total = cfg.max_steps or max(1, math.ceil(cfg.num_train_epochs * len(train_data) / per_step))
    warmup = int(cfg.warmup_proportion * total)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, total, warmup, cfg.lr_scheduler))
    use_ds = cfg.zero_stage is not None or _world() > 1
    runner = (_DeepSpeed if use_ds else _Plain)(model, opt, sched, cfg)
    start, history = 0, []
    if cfg.resume and (ckpt := latest_checkpoint(out)) is not None:
        state = torch.load(ckpt / "trainer_state.pt", weights_only=False)
        start, history = state["step"], state["history"]
        runner.load_state(ckpt, state, start)
        torch.set_rng_state(state["rng"]["torch"])
        np.random.set_state(state["rng"]["numpy"])
        random.setstate(state["rng"]["python"])
    lead = runner.rank == 0
    if lead:
        (out / "train_config.json").write_text(json.dumps(asdict(cfg), indent=2) + "\n")
    log = open(out / "log.jsonl", "a", encoding="utf-8") if lead else None
    n_params = sum(p.numel() for p in model.parameters())
    peak = measured_matmul_flops(cfg.device, torch.bfloat16 if cfg.precision == "bf16" else torch.float32)
    writer = None
    if cfg.tensorboard and lead:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ValueError("--tensorboard needs the tensorboard package (pip install tensorboard)") from None
        writer = SummaryWriter(str(out / "tensorboard"))
    bar = None
    if cfg.progress and lead:
        from tqdm import tqdm

        bar = tqdm(total=total, initial=start, desc=f"{cfg.stage}", unit="step", dynamic_ncols=True)
    try:
        for step in range(start, total):
            t0 = time.perf_counter()
            loss_sum, tokens = 0.0, 0
            lr = runner.lr()  # the rate this step's update uses
            for micro in range(cfg.gradient_accumulation_steps):
                # each rank its own batches of one deterministic stream
                batch = train_data.batch((step * cfg.gradient_accumulation_steps + micro) * runner.world + runner.rank)
                loss, n = _loss(runner.model, batch, cfg.stage, cfg.precision, cfg.device)
                runner.backward(loss)
                runner.micro_step()
                loss_sum += float(loss.detach())
                tokens += int(batch["input_ids"].numel()) * runner.world
            grad_norm = runner.step()
            loss_sum = runner.mean(loss_sum)
            dt = time.perf_counter() - t0
            rec = {"step": step + 1, "loss": loss_sum / cfg.gradient_accumulation_steps, "lr": lr,
                   "grad_norm": grad_norm, "tokens_per_s": tokens / dt, "flops_per_s": 6 * n_params * tokens / dt,
                   "mfu": 6 * n_params * tokens / dt / (peak * runner.world),
                   "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
            if cfg.eval_steps and val is not None and (step + 1) % cfg.eval_steps == 0:
                rec.update(evaluate(runner.model, val, cfg))
            history.append(rec)
            if lead and ((step + 1) % cfg.log_every == 0 or step + 1 == total):
                log.write(json.dumps(rec) + "\n")
                log.flush()
                if writer is not None:
                    for k, v in rec.items():
                        if k != "step":
                            writer.add_scalar(f"train/{k}", v, step + 1)
            if bar is not None:
                bar.set_postfix(loss=f"{rec['loss']:.4f}", lr=f"{lr:.2e}", tok_s=f"{rec['tokens_per_s']:.0f}")
                bar.update(1)
            if cfg.save_steps and (step + 1) % cfg.save_steps == 0 and step + 1 < total:
                _save(out, step + 1, llm, runner, cfg, history)
        final = _save(out, total, llm, runner, cfg, history) if start < total or latest_checkpoint(out) is None \
            else latest_checkpoint(out)
    finally:
        if log is not None:
            log.close()
        if writer is not None:
            writer.close()
        if bar is not None:
            bar.close()
    summary = {"steps": total, "checkpoint": str(final), "history": history, "rank": runner.rank,
               "world_size": runner.world, "engine": "deepspeed" if use_ds else "pytorch"}
    if val is not None:
        summary.update(evaluate(runner.model, val, cfg))
    return summary
