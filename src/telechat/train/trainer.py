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
    mix: Literal["natural", "uniform", "dynamic"] = "natural"  # how several sources are sampled
    mix_every: int = 0  # dynamic: reweight every N steps (0: --eval-steps, or 50)
    mix_eta: float = 1.0  # dynamic: weight ~ exp(eta * excess loss in nats)
    mix_min_weight: float = 0.05
    mix_max_weight: float = 0.95
    mix_eval_batches: int = 4  # dynamic: held-out batches per source and measurement
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
        if not 0 <= self.mix_min_weight <= self.mix_max_weight <= 1:
            raise ValueError(f"need 0 <= mix_min_weight <= mix_max_weight <= 1, got {self.mix_min_weight} "
                             f"and {self.mix_max_weight}")
        if self.mix_every < 0 or self.mix_eval_batches < 1 or self.mix_eta < 0:
            raise ValueError("mix_every must be >= 0, mix_eval_batches >= 1 and mix_eta >= 0")


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

    def stream_row(self, position: int) -> int:
        """The row at `position` of the endless stream (epoch after epoch)."""
        return int(self.order(position // len(self.rows))[position % len(self.rows)])

    def batch(self, index: int) -> dict[str, torch.Tensor]:
        """The `index`-th batch of the endless stream."""
        return self.take([self.stream_row(index * self.batch_size + i) for i in range(self.batch_size)])

    def micro_batch(self, micro: int, rank: int, world: int) -> dict[str, torch.Tensor]:
        """This rank's share of global micro-batch `micro`; every rank reads its own batches."""
        return self.batch(micro * world + rank)

    def max_token_id(self) -> int:
        return int(np.max(np.asarray(self.arrays["input_ids"][:256])))

    def take(self, picks) -> dict[str, torch.Tensor]:
        picks = np.asarray(picks)
        out = {"input_ids": torch.from_numpy(np.asarray(self.arrays["input_ids"][picks], np.int64))}
        for name in ("loss_mask", "segment_ids"):
            if name in self.arrays:
                out[name] = torch.from_numpy(np.asarray(self.arrays[name][picks], np.int64))
        return out


def bounded_weights(w: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """`w` normalised, then moved into [lo, hi] per entry while still summing to one."""
    w = np.asarray(w, np.float64) / np.sum(w)
    for _ in range(len(w) + 1):
        clipped = np.clip(w, lo, hi)
        gap = 1.0 - clipped.sum()
        free = (clipped > lo) if gap < 0 else (clipped < hi)
        if abs(gap) < 1e-12 or not free.any():
            return clipped / clipped.sum()
        w = clipped
        w[free] += gap * w[free] / w[free].sum()
    return w / w.sum()


def dynamic_weights(losses: np.ndarray, floor: float, prior: np.ndarray, eta: float, lo: float, hi: float) -> np.ndarray:
    """Weights tilted toward the sources whose held-out loss sits furthest above the running minimum.

    The running minimum is the lowest held-out loss reached on any source so far. (A per-source
    minimum is no signal: a source the model is still learning always sits at its own minimum.) A
    source the model has already learned sits near it and gives way; a harder one, or one being
    forgotten, gains: w_i ~ prior_i * exp(eta * (loss_i - floor)), then bounded to [lo, hi] so that
    no source starves and an unlearnable one cannot take over.
    """
    excess = np.asarray(losses, np.float64) - floor
    logits = np.log(np.asarray(prior, np.float64)) + eta * (excess - excess.max())
    return bounded_weights(np.exp(logits), lo, hi)


class Mixture:
    """Several prepared sources, sampled by weight.

    The source of every sample is drawn from (seed, micro-batch, slot) with the weights in force, and
    each source is read in its own deterministic order; every rank draws the whole global micro-batch
    and keeps its own slice, so all ranks hold the same cursors and a resumed run (which restores
    cursors and weights) draws exactly what an uninterrupted one would.
    """

    def __init__(self, sources: dict[str, Batches], weights: np.ndarray, batch_size: int, seed: int):
        self.sources, self.names = sources, list(sources)
        self.batch_size, self.seed = batch_size, seed
        self.weights = np.asarray(weights, np.float64)
        self.prior = self.weights.copy()
        self.cursors = np.zeros(len(sources), np.int64)
        self.floor = math.inf

    def __len__(self) -> int:
        return sum(len(b) for b in self.sources.values())

    def max_token_id(self) -> int:
        return max(b.max_token_id() for b in self.sources.values())

    def micro_batch(self, micro: int, rank: int, world: int) -> dict[str, torch.Tensor]:
        rng = np.random.default_rng([self.seed, 7, micro])
        choice = rng.choice(len(self.names), size=self.batch_size * world, p=self.weights)
        picks = []
        for s in choice:
            picks.append((int(s), self.sources[self.names[s]].stream_row(int(self.cursors[s]))))
            self.cursors[s] += 1
        parts = [self.sources[self.names[s]].take([row]) for s, row in picks[rank * self.batch_size:
                                                                              (rank + 1) * self.batch_size]]
        return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}

    def reweight(self, losses: dict[str, float], eta: float, lo: float, hi: float) -> None:
        vec = np.array([losses[n] for n in self.names])
        self.floor = min(self.floor, float(vec.min()))
        self.weights = dynamic_weights(vec, self.floor, self.prior, eta, lo, hi)

    def weight_dict(self) -> dict[str, float]:
        return {n: float(w) for n, w in zip(self.names, self.weights)}

    def state_dict(self) -> dict:
        return {"names": self.names, "weights": self.weights.tolist(), "prior": self.prior.tolist(),
                "cursors": self.cursors.tolist(), "floor": self.floor}

    def load_state_dict(self, state: dict) -> None:
        if state["names"] != self.names:
            raise ValueError(f"the checkpoint was trained on sources {state['names']}, not {self.names}")
        self.weights, self.prior = np.array(state["weights"]), np.array(state["prior"])
        self.cursors, self.floor = np.array(state["cursors"], np.int64), float(state["floor"])


def source_folders(data: str) -> dict[str, Path] | None:
    """Several sources: comma-separated prepared folders, or a folder whose subfolders are prepared
    folders (one per source). None for a single prepared folder."""
    parts = [Path(p) for p in data.split(",") if p.strip()]
    if len(parts) > 1:
        names = [p.name for p in parts]
        if len(set(names)) < len(names):
            return {str(p): p for p in parts}
        return dict(zip(names, parts))
    root = parts[0] if parts else Path(data)
    if (root / "manifest.json").exists() or not root.is_dir():
        return None
    subs = sorted(d for d in root.iterdir() if (d / "manifest.json").exists())
    return {d.name: d for d in subs} or None


def _one_source(cfg: TrainConfig, path: str | Path) -> tuple[Batches, Batches | None, dict]:
    mf = Path(path) / "manifest.json"
    mode = json.loads(mf.read_text(encoding="utf-8")).get("mode") if mf.exists() else None
    if mode is not None and mode != cfg.stage:
        raise ValueError(f"{path}: prepared with --mode {mode}, not {cfg.stage}")
    if cfg.stage == "sft":
        arrays = load_prepared(path)
        if arrays["manifest"]["mode"] != "sft":
            raise ValueError(f"{path}: prepared with --mode {arrays['manifest']['mode']}, not sft")
        n = len(arrays["input_ids"])
        rows = np.random.default_rng([cfg.seed, 99]).permutation(n)
        n_val = int(round(n * cfg.eval_fraction)) if n > 1 else 0
        train = Batches(arrays, np.sort(rows[n_val:]), cfg.per_device_batch_size, cfg.seed)
        val = Batches(arrays, np.sort(rows[:n_val]), cfg.per_device_batch_size, cfg.seed) if n_val else None
        manifest = arrays["manifest"]
    else:
        arrays = load_prepared(path, "train")
        if arrays["manifest"]["mode"] != "pretrain":
            raise ValueError(f"{path}: prepared with --mode {arrays['manifest']['mode']}, not pretrain")
        train = Batches(arrays, np.arange(len(arrays["input_ids"])), cfg.per_device_batch_size, cfg.seed)
        val_arrays = load_prepared(path, "val")
        val = Batches(val_arrays, np.arange(len(val_arrays["input_ids"])), cfg.per_device_batch_size, cfg.seed) \
            if len(val_arrays["input_ids"]) else None
        manifest = arrays["manifest"]
    seq = manifest["max_seq_len"]
    if cfg.max_seq_len is not None and cfg.max_seq_len != seq:
        raise ValueError(f"{path} was prepared with max_seq_len {seq}, not {cfg.max_seq_len}: prepare it again")
    if len(train) == 0:
        raise ValueError(f"{path}: no training samples")
    return train, val, manifest


def _datasets(cfg: TrainConfig) -> tuple[Batches | Mixture, dict[str, Batches], dict]:
    """The training stream, the held-out sets by source name ("" for a single source), the manifest."""
    folders = source_folders(cfg.data)
    if folders is None:
        if cfg.mix == "dynamic":
            raise ValueError(f"--mix dynamic needs several sources: --data with one prepared folder per source "
                             f"(DIR/SOURCE/manifest.json) or A,B; {cfg.data} is a single prepared folder")
        train, val, manifest = _one_source(cfg, cfg.data)
        return train, ({"": val} if val is not None else {}), manifest
    parts = {name: _one_source(cfg, path) for name, path in folders.items()}
    first_name, (_, _, manifest) = next(iter(parts.items()))
    for name, (_, _, m) in parts.items():
        for key in ("max_seq_len", "tokenizer"):
            if m.get(key) != manifest.get(key):
                raise ValueError(f"sources {first_name} and {name} differ in {key}: {manifest.get(key)!r} vs "
                                 f"{m.get(key)!r}; prepare them with the same tokenizer and --max-seq-len")
    if cfg.mix == "dynamic":
        missing = [n for n, (_, v, _) in parts.items() if v is None]
        if missing:
            raise ValueError(f"--mix dynamic measures each source's held-out loss, but {', '.join(missing)} has no "
                             "held-out samples (pretrain: a val/ split; sft: --eval-fraction of the samples)")
    sizes = np.array([len(t) for t, _, _ in parts.values()], np.float64)
    weights = np.full(len(sizes), 1 / len(sizes)) if cfg.mix == "uniform" else sizes / sizes.sum()
    if cfg.mix == "dynamic":
        weights = bounded_weights(weights, cfg.mix_min_weight, cfg.mix_max_weight)
    train = Mixture({n: t for n, (t, _, _) in parts.items()}, weights, cfg.per_device_batch_size, cfg.seed)
    return train, {n: v for n, (_, v, _) in parts.items() if v is not None}, manifest


# ---- model, optimizer, schedule ----------------------------------------------------------------
def _build(cfg: TrainConfig, manifest: dict, data: Batches | Mixture) -> LLM:
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
    top = data.max_token_id()
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
def _save(out: Path, step: int, llm: LLM, runner: _Plain, cfg: TrainConfig, history: list[dict],
          mixture: Mixture | None = None) -> Path:
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
                 "mixture": mixture.state_dict() if mixture is not None else None,
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

    def close(self) -> None:
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
        self.cpu = cfg.device == "cpu"

    def close(self) -> None:
        """Unlink this rank's shared-memory all-reduce buffer, which DeepSpeed's CPU backend leaves in
        /dev/shm at exit (64 MiB per rank per run), once every rank has it mapped."""
        if not self.cpu:
            return
        self.barrier()
        name = f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_" \
               f"{os.environ.get('MASTER_PORT', '')}_{self.rank}"
        Path("/dev/shm", name).unlink(missing_ok=True)

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
    """The matmul rate this device reaches (FLOP/s), the denominator of the MFU estimate: the fastest of
    several timed products, so that another job's burst during the measurement does not lower it."""
    n = 1024
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device != "cpu" and torch.cuda.is_available() else (lambda: None)
    a @ b  # warm-up
    sync()
    best, t0 = float("inf"), time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        t = time.perf_counter()
        for _ in range(4):  # several products per timing: a GPU launch alone is not a measurement
            a @ b
        sync()
        best = min(best, (time.perf_counter() - t) / 4)
    return 2 * n**3 / best


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
def _held_out_loss(model, val: Batches, cfg: TrainConfig, max_batches: int | None = None) -> tuple[float, int]:
    """Summed token loss and token count over (the first `max_batches` batches of) a held-out set."""
    total, tokens = 0.0, 0
    for b, i in enumerate(range(0, len(val), val.batch_size)):
        if max_batches is not None and b >= max_batches:
            break
        loss, n = _loss(model, val.take(val.rows[i:i + val.batch_size]), cfg.stage, cfg.precision, cfg.device)
        total, tokens = total + float(loss) * n, tokens + n
    return total, tokens


def evaluate(model, vals: dict[str, Batches], cfg: TrainConfig) -> dict:
    """Validation loss and perplexity over all held-out sets; with several sources, also per source."""
    model.eval()
    parts = {name: _held_out_loss(model, v, cfg) for name, v in vals.items()}
    model.train()
    total, tokens = sum(t for t, _ in parts.values()), sum(n for _, n in parts.values())
    mean = total / max(tokens, 1)
    out = {"val_loss": mean, "val_ppl": math.exp(min(mean, 50))}
    if len(parts) > 1:
        out["val_loss_by_source"] = {name: t / max(n, 1) for name, (t, n) in parts.items()}
    return out


def _measure_sources(runner, vals: dict[str, Batches], cfg: TrainConfig) -> dict[str, float]:
    """Each source's held-out loss on its first --mix-eval-batches batches, the same on every rank."""
    runner.model.eval()
    out = {}
    for name, v in vals.items():
        total, tokens = _held_out_loss(runner.model, v, cfg, cfg.mix_eval_batches)
        out[name] = runner.mean(total / max(tokens, 1))
    runner.model.train()
    return out


def train(cfg: TrainConfig) -> dict:
    """Run (or resume) training; returns a summary with the per-step history."""
    cfg.check()
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    train_data, vals, manifest = _datasets(cfg)
    mixture = train_data if isinstance(train_data, Mixture) else None
    mix_every = cfg.mix_every or cfg.eval_steps or 50
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
        if mixture is not None:
            mixture.load_state_dict(state["mixture"])
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
                batch = train_data.micro_batch(step * cfg.gradient_accumulation_steps + micro, runner.rank, runner.world)
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
            if mixture is not None and cfg.mix == "dynamic" and (step + 1) % mix_every == 0:
                rec["mix_val_loss"] = _measure_sources(runner, vals, cfg)
                mixture.reweight(rec["mix_val_loss"], cfg.mix_eta, cfg.mix_min_weight, cfg.mix_max_weight)
            if mixture is not None and ("mix_val_loss" in rec or step == start):
                rec["mix_weights"] = mixture.weight_dict()  # in force from the next step on
            if cfg.eval_steps and vals and (step + 1) % cfg.eval_steps == 0:
                rec.update(evaluate(runner.model, vals, cfg))
            history.append(rec)
            if lead and ((step + 1) % cfg.log_every == 0 or step + 1 == total):
                log.write(json.dumps(rec) + "\n")
                log.flush()
                if writer is not None:
                    for k, v in rec.items():
                        for name, x in (v.items() if isinstance(v, dict) else [("", v)]):
                            if k != "step":
                                writer.add_scalar(f"train/{k}" + (f"/{name}" if name else ""), x, step + 1)
            if bar is not None:
                bar.set_postfix(loss=f"{rec['loss']:.4f}", lr=f"{lr:.2e}", tok_s=f"{rec['tokens_per_s']:.0f}")
                bar.update(1)
            if cfg.save_steps and (step + 1) % cfg.save_steps == 0 and step + 1 < total:
                _save(out, step + 1, llm, runner, cfg, history, mixture)
        final = _save(out, total, llm, runner, cfg, history, mixture) if start < total or latest_checkpoint(out) is None \
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
    if vals:
        summary.update(evaluate(runner.model, vals, cfg))
    if mixture is not None:
        summary["mix_weights"] = mixture.weight_dict()
    runner.close()
    return summary
