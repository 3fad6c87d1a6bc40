"""Pre-training and SFT on prepared data: one loop, deterministic, resumable bit for bit.

The data order is a function of (seed, step) alone and every checkpoint holds the weights (an
official-layout folder `telechat.load` reads), the optimizer, the schedule and the RNG states, so
`resume=True` continues exactly where an uninterrupted run would be.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import random
import re
import resource
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from ..checkpoint import load_model
from ..data.prepare import load_prepared, tokenizer_fingerprint
from ..llm import LLM, default_generation_config, from_preset, load
from ..model import packed_labels
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
    overwrite: bool = False  # start afresh in a folder that holds an earlier run (its files are deleted)
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
    lora_dim: int = 0  # LoRA rank (0: no LoRA); TeleChat's --lora_dim
    lora_scaling: float = 1.0  # the update is (lora_scaling / lora_dim) * B @ A: PEFT's lora_alpha
    lora_module_name: str = "self_attention.,mlp."  # comma-separated parts of the names LoRA wraps
    only_optimize_lora: bool = False  # TeleChat's --mark_only_lora_as_trainable
    extra: dict = field(default_factory=dict)

    def check(self) -> None:
        if (self.model is None) == (self.preset is None):
            raise ValueError("give exactly one of --model PATH and --preset NAME")
        for name in ("per_device_batch_size", "gradient_accumulation_steps", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1 (or unset, to train --num-train-epochs), got {self.max_steps}")
        if not 0 < self.num_train_epochs < math.inf:
            raise ValueError(f"num_train_epochs must be > 0, got {self.num_train_epochs}")
        for name in ("save_steps", "eval_steps", "mix_every", "seed"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("learning_rate", "weight_decay"):
            if not 0 <= getattr(self, name) < math.inf:  # also refuses NaN
                raise ValueError(f"{name} must be a finite number >= 0, got {getattr(self, name)}")
        if not 0 <= self.eval_fraction < 1:
            raise ValueError(f"eval_fraction must be in [0, 1), got {self.eval_fraction}")
        if self.max_seq_len is not None and self.max_seq_len < 1:
            raise ValueError(f"max_seq_len must be >= 1, got {self.max_seq_len}")
        if self.resume and self.overwrite:
            raise ValueError("--resume continues the run in the output folder and --overwrite deletes it: give one")
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
        if not isinstance(self.lora_dim, int) or isinstance(self.lora_dim, bool) or self.lora_dim < 0:
            raise ValueError(f"lora_dim must be an integer >= 0 (0: no LoRA), got {self.lora_dim!r}")
        if not 0 < self.lora_scaling < math.inf:
            raise ValueError(f"lora_scaling must be a finite number > 0, got {self.lora_scaling}")
        if self.only_optimize_lora and not self.lora_dim:
            raise ValueError("--only-optimize-lora needs --lora-dim R (the LoRA rank)")
        if self.mix_eval_batches < 1 or not 0 <= self.mix_eta < math.inf:
            raise ValueError(f"mix_eval_batches must be >= 1 and mix_eta a finite number >= 0, got "
                             f"{self.mix_eval_batches} and {self.mix_eta}")


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

    def id_range(self) -> tuple[int, int]:
        """The smallest and largest token id in the whole array (read in chunks: memory stays small)."""
        return id_range(self.arrays["input_ids"])

    def take(self, picks) -> dict[str, torch.Tensor]:
        picks = np.asarray(picks)
        out = {"input_ids": torch.from_numpy(np.asarray(self.arrays["input_ids"][picks], np.int64))}
        for name in ("loss_mask", "segment_ids"):
            if name in self.arrays:
                out[name] = torch.from_numpy(np.asarray(self.arrays[name][picks], np.int64))
        return out


def id_range(ids, chunk: int = 4096) -> tuple[int, int]:
    """(min, max) of a (memory-mapped) array of token ids; (0, -1) when it is empty."""
    lo, hi = None, None
    for i in range(0, len(ids), chunk):
        part = np.asarray(ids[i:i + chunk])
        if part.size:
            a, b = int(part.min()), int(part.max())
            lo, hi = (a, b) if lo is None else (min(lo, a), max(hi, b))
    return (0, -1) if lo is None else (lo, hi)


def notice(message: str) -> None:
    """A line for the person running the job, on stderr, once (rank 0) however many processes run."""
    if os.environ.get("RANK", "0") == "0":
        print(message, file=sys.stderr, flush=True)


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

    def id_range(self) -> tuple[int, int]:
        ranges = [b.id_range() for b in self.sources.values()]
        return min(lo for lo, _ in ranges), max(hi for _, hi in ranges)

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
        if n - n_val < 1:
            raise ValueError(f"{path}: no training samples ({n} samples, {n_val} of them held out by --eval-fraction "
                             f"{cfg.eval_fraction})")
        if cfg.eval_fraction > 0 and n_val == 0:
            notice(f"warning: {path}: {n} samples x --eval-fraction {cfg.eval_fraction} holds out no sample: "
                   "no validation loss will be measured")
        elif n_val > n - n_val:
            notice(f"warning: {path}: more samples held out ({n_val}) than left for training ({n - n_val}); "
                   "lower --eval-fraction")
        train = Batches(arrays, np.sort(rows[n_val:]), cfg.per_device_batch_size, cfg.seed)
        val = Batches(arrays, np.sort(rows[:n_val]), cfg.per_device_batch_size, cfg.seed) if n_val else None
        manifest = arrays["manifest"]
    else:
        arrays = load_prepared(path, "train")
        if arrays["manifest"]["mode"] != "pretrain":
            raise ValueError(f"{path}: prepared with --mode {arrays['manifest']['mode']}, not pretrain")
        train = Batches(arrays, np.arange(len(arrays["input_ids"])), cfg.per_device_batch_size, cfg.seed)
        val_arrays = load_prepared(path, "val") if (Path(path) / "val").is_dir() else {"input_ids": np.zeros((0, 1))}
        n_train, n_val = len(arrays["input_ids"]), len(val_arrays["input_ids"])
        if n_train == 0:
            raise ValueError(f"{path}: the train/ split has 0 blocks (val/ has {n_val}): nothing to train on; prepare "
                             "it again with more text or a smaller --val-fraction")
        if n_val == 0:
            notice(f"warning: {path}: the val/ split has 0 blocks: no validation loss will be measured (prepare "
                   "with more text or a larger --val-fraction)")
        elif n_val > n_train:
            notice(f"warning: {path}: the val/ split ({n_val} blocks) is larger than the train/ split ({n_train}); "
                   "prepare it again with a smaller --val-fraction")
        val = Batches(val_arrays, np.arange(n_val), cfg.per_device_batch_size, cfg.seed) if n_val else None
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
def check_data_tokenizer(manifest: dict, data_tokenizer, model_tokenizer, data: str, model: str) -> None:
    """Refuse data prepared with a tokenizer other than the model's: its ids would name other tokens.

    What the manifest recorded at prepare time (`tokenizer_vocab_size`, `tokenizer_fingerprint`) wins
    over the tokenizer file it names, which may have changed since."""
    vocab = manifest.get("tokenizer_vocab_size")
    if not isinstance(vocab, int) and data_tokenizer is not None:
        vocab = len(data_tokenizer)
    digest = manifest.get("tokenizer_fingerprint")
    if not isinstance(digest, str) and data_tokenizer is not None:
        digest = tokenizer_fingerprint(data_tokenizer)
    named = manifest.get("tokenizer") or "(not recorded)"
    mine = f"{model}'s tokenizer ({getattr(model_tokenizer, 'path', '?')}, vocab {len(model_tokenizer)})"
    if isinstance(vocab, int) and vocab != len(model_tokenizer):
        raise ValueError(f"{data} was prepared with the tokenizer {named} (vocab {vocab}), not with {mine}: the "
                         f"token ids would mean other tokens; prepare the data again with --tokenizer {model}")
    if isinstance(digest, str) and digest != tokenizer_fingerprint(model_tokenizer):
        raise ValueError(f"{data} was prepared with the tokenizer {named}, not with {mine} (same vocab size, other "
                         f"pieces): the token ids would mean other tokens; prepare the data again with --tokenizer "
                         f"{model}")


def _build(cfg: TrainConfig, manifest: dict, data: Batches | Mixture, vals: dict[str, Batches]) -> LLM:
    tok_path = manifest.get("tokenizer")
    tokenizer = load_tokenizer(tok_path) if isinstance(tok_path, str) and Path(tok_path).exists() else None
    if cfg.model is not None:
        llm = load(cfg.model, device=cfg.device, dtype=torch.float32)
        if llm.tokenizer is None:
            llm.tokenizer = tokenizer
        else:
            check_data_tokenizer(manifest, tokenizer, llm.tokenizer, cfg.data, cfg.model)
    else:
        over = {}
        if tokenizer is not None:  # the embedding must cover the data's vocabulary
            over["vocab_size"] = -(-len(tokenizer) // 64) * 64
            over.update({k: getattr(tokenizer, a) for k, a in (("pad_token_id", "pad_id"), ("eos_token_id", "eos_id"),
                                                                ("bos_token_id", "bos_id")) if getattr(tokenizer, a) is not None})
        over["seq_length"] = max(manifest["max_seq_len"], 32)
        llm = from_preset(cfg.preset, device=cfg.device, seed=cfg.seed, tokenizer=tokenizer, **over)
        llm.generation_config = default_generation_config(llm.config, tokenizer)
    ranges = [data.id_range()] + [v.id_range() for v in vals.values()]
    lo, hi = min(r[0] for r in ranges), max(r[1] for r in ranges)
    if lo < 0 or hi >= llm.config.vocab_size:
        raise ValueError(f"{cfg.data} has token ids from {lo} to {hi}, outside the model's vocabulary (vocab_size "
                         f"{llm.config.vocab_size}): the data was prepared with another tokenizer "
                         f"({tok_path or 'not recorded'}); prepare it again with the model's tokenizer")
    return llm


def saves_base(cfg: TrainConfig) -> bool:
    """Whether a LoRA checkpoint holds the base weights too: they train (no --only-optimize-lora), or
    there is no base folder to find them in (--preset)."""
    return not cfg.only_optimize_lora or cfg.model is None


def _add_lora(llm: LLM, cfg: TrainConfig):
    """LoRA on the model (PEFT), its LoraConfig; None without --lora-dim. A GPTQ base trains only so."""
    from ..quant import quantized_layers

    if not cfg.lora_dim:
        if quantized_layers(llm.model):
            raise ValueError(f"{cfg.model} is a GPTQ-quantized model: its quantized weights cannot train; give "
                             "--lora-dim R (QLoRA: LoRA beside the frozen quantized layers) or train the float model")
        return None
    from ..default_model import resolve_model
    from ..lora import add_lora, lora_layers, trainable_summary

    base = str(Path(resolve_model(cfg.model)).resolve()) if cfg.model is not None and not saves_base(cfg) else None
    adapter = add_lora(llm.model, cfg.lora_dim, cfg.lora_scaling, cfg.lora_module_name, cfg.only_optimize_lora,
                       base)
    notice(f"LoRA r={cfg.lora_dim} on {len(lora_layers(llm.model))} layers: {trainable_summary(llm.model)}")
    return adapter


def _optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    decay = [p for n, p in model.named_parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.requires_grad and p.dim() < 2]  # biases, norms
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]  # LoRA alone has no 1-D weights; DeepSpeed drops empty groups
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
            if runner.adapter is None:
                llm.save(tmp)
            else:
                from ..lora import save_adapter, unwrapped

                if saves_base(cfg):
                    with unwrapped(llm.model):
                        llm.save(tmp)
                save_adapter(llm.model, runner.adapter, tmp)
    runner.barrier()
    extra = runner.save_state(tmp)  # collective under DeepSpeed
    runner.barrier()
    if runner.rank == 0:
        state = {"format": STATE_FORMAT, "step": step, "config": asdict(cfg), "history": history, **extra,
                 "mixture": mixture.state_dict() if mixture is not None else None, "rng": _rng_state()}
        torch.save(state, tmp / "trainer_state.pt")  # tensors and plain data only: torch.load(weights_only=True)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        (out / "latest.tmp").write_text(final.name)
        os.replace(out / "latest.tmp", out / "latest")
    runner.barrier()
    return final


def latest_checkpoint(out: Path) -> Path | None:
    """The checkpoint OUT/latest names, if it is complete; else None (resume_point says why)."""
    try:
        return resume_point(Path(out))
    except ValueError:
        return None


STATE_FORMAT = 2  # trainer_state.pt: plain data and tensors (1: numpy RNG arrays, unpickled unsafely)
_CHECKPOINT_NAME = re.compile(r"checkpoint-\d{7,}")
RUN_FILES = ("latest", "log.jsonl", "train_config.json")  # with checkpoint-*/: the marks of a run in a folder


def _rng_state() -> dict:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"torch": torch.get_rng_state(), "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos),
                                                       int(has_gauss), float(gauss)], "python": random.getstate()}


def _set_rng_state(rng: dict) -> None:
    kind, keys, pos, has_gauss, gauss = rng["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(rng["torch"])
    version, internal, gauss_next = rng["python"]
    random.setstate((version, tuple(internal), gauss_next))


def _checkpoints(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir() if p.is_dir() and _CHECKPOINT_NAME.fullmatch(p.name)) \
        if out.is_dir() else []


def earlier_run(out: Path) -> list[str]:
    """The files and checkpoint folders of an earlier run in `out` (none: a new or unrelated folder)."""
    out = Path(out)
    return [n for n in RUN_FILES if (out / n).exists()] + _checkpoints(out) if out.is_dir() else []


def resume_point(out: Path) -> Path | None:
    """The checkpoint `--resume` continues from: the one OUT/latest names. None when `out` holds no
    checkpoint at all (nothing to resume: training starts); a ValueError naming the problem when it holds
    checkpoints but `latest` does not name a complete one (never silently start over beside them)."""
    out = Path(out)
    latest, found = out / "latest", _checkpoints(out)
    fix = (f"write the name of a complete checkpoint into {latest} (found: {', '.join(found[-3:])})" if found else
           f"no checkpoint folder is left in {out}; train into a new folder, or start over with --overwrite")
    if not latest.exists() and not latest.is_symlink():
        if not found:
            return None
        raise ValueError(f"{out}: holds checkpoints but no 'latest' file naming the one to resume from; {fix}")
    try:
        name = latest.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{latest}: cannot be read ({e}); {fix}") from None
    if not _CHECKPOINT_NAME.fullmatch(name):
        raise ValueError(f"{latest}: should name a checkpoint folder (checkpoint-NNNNNNN), holds {name[:60]!r}; {fix}")
    path = out / name
    if not path.is_dir():
        raise ValueError(f"{latest} names {name}, which does not exist; {fix}")
    if not (path / "trainer_state.pt").is_file():
        raise ValueError(f"{path}: incomplete checkpoint (no trainer_state.pt); {fix}")
    return path


def load_trainer_state(ckpt: Path) -> dict:
    """trainer_state.pt, read as tensors and plain data only (a pickle naming any other object, which could
    run code when unpickled, is refused), and checked for the fields a resume needs."""
    f = Path(ckpt) / "trainer_state.pt"
    try:
        state = torch.load(f, map_location="cpu", weights_only=True)
    except Exception as e:  # a damaged zip, a foreign pickle, a forbidden global: all mean "cannot use it"
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise ValueError(f"{f}: not a readable trainer state ({reason}); it is damaged, written by another program "
                         "or an older telechat, or holds objects other than tensors and plain data (refused: "
                         "unpickling them could run code)") from None

    def bad(what: str) -> ValueError:
        return ValueError(f"{f}: not a valid trainer state ({what})")
    if not isinstance(state, dict):
        raise bad(f"a {type(state).__name__}, not a dict")
    if state.get("format") != STATE_FORMAT:
        raise bad(f"format {state.get('format')!r}, this telechat reads {STATE_FORMAT}")
    step = state.get("step")
    if not isinstance(step, int) or isinstance(step, bool) or f"checkpoint-{step:07d}" != Path(ckpt).name:
        raise bad(f"step {step!r} does not match the folder name {Path(ckpt).name}")
    history = state.get("history")
    if not isinstance(history, list) or not all(isinstance(h, dict) for h in history):
        raise bad("'history' is not a list of records")
    rng = state.get("rng")
    ok = (isinstance(rng, dict) and isinstance(rng.get("torch"), torch.Tensor)
          and isinstance(rng.get("numpy"), (list, tuple)) and len(rng["numpy"]) == 5
          and isinstance(rng["numpy"][1], torch.Tensor) and isinstance(rng.get("python"), (list, tuple))
          and len(rng["python"]) == 3)
    if not ok:
        raise bad("'rng' is missing or malformed")
    if state.get("mixture") is not None and not isinstance(state["mixture"], dict):
        raise bad("'mixture' is malformed")
    optimizer = state.get("optimizer")
    slots = optimizer.get("state") if isinstance(optimizer, dict) else None
    for per_param in (slots.values() if isinstance(slots, dict) else []):
        for name, t in (per_param.items() if isinstance(per_param, dict) else []):
            if isinstance(t, torch.Tensor) and t.is_floating_point() and not torch.isfinite(t).all():
                raise ValueError(f"{ckpt}: the optimizer state ({name}) holds NaN or Inf values; resume from an "
                                 "earlier checkpoint (write its name into OUTPUT/latest)")
    return state


def check_finite_weights(folder: Path) -> None:
    """Refuse a checkpoint whose weights hold NaN or Inf: training from it only produces NaN losses."""
    from safetensors import safe_open

    for file in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                t = f.get_tensor(name)
                if t.is_floating_point() and not torch.isfinite(t).all():
                    raise ValueError(f"{folder}: the weight {name} ({file.name}) holds NaN or Inf values; resume "
                                     "from an earlier checkpoint (write its name into OUTPUT/latest)")


# DeepSpeed's own classes in its checkpoint files: plain records, rebuilt from their attributes.
DEEPSPEED_CHECKPOINT_GLOBALS = ("deepspeed.runtime.fp16.loss_scaler.LossScaler",
                                "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
                                "deepspeed.runtime.zero.config.ZeroStageEnum",
                                "deepspeed.utils.tensor_fragment.fragment_address")  # ZeRO 1/2 with frozen params


def check_deepspeed_files(folder: Path) -> None:
    """DeepSpeed unpickles its checkpoint files without restriction: read each first as tensors, plain
    data and DeepSpeed's own record classes only, and refuse the checkpoint when one holds anything else."""
    import importlib

    allowed = []
    for name in DEEPSPEED_CHECKPOINT_GLOBALS:
        module, _, attr = name.rpartition(".")
        try:
            allowed.append(getattr(importlib.import_module(module), attr))
        except (ImportError, AttributeError):
            pass  # another DeepSpeed version: its files cannot hold it either
    files = sorted(Path(folder).rglob("*.pt"))
    if not files:
        raise ValueError(f"{folder}: no DeepSpeed state files (written by a plain PyTorch run? resume it without "
                         "--zero-stage/--nproc)")
    for f in files:
        try:
            with torch.serialization.safe_globals(allowed):
                torch.load(f, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            raise ValueError(f"{f}: not a readable DeepSpeed state file ({reason}); it is damaged or holds objects "
                             "other than tensors and plain data (refused: unpickling them could run code)") from None


def _truncate_log(log: Path, step: int) -> None:
    """Keep the log records of steps up to `step` (those the resumed checkpoint holds): the steps after
    it are trained again and logged again, once."""
    if not log.exists():
        return
    keep = []
    with open(log, encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                rec = json.loads(line)
            except ValueError:
                continue  # a line cut short by a kill
            if isinstance(rec, dict) and isinstance(rec.get("step"), int) and rec["step"] <= step:
                keep.append(line if line.endswith("\n") else line + "\n")
    tmp = log.with_name(log.name + ".tmp")
    tmp.write_text("".join(keep), encoding="utf-8")
    os.replace(tmp, log)


def check_output(cfg: TrainConfig, announce: bool = True) -> Path | None:
    """What the output folder allows, before anything is built: the checkpoint to resume from (with
    --resume), or None to start; a ValueError when the folder holds another run and neither --resume
    nor --overwrite was given, or when --resume finds no valid checkpoint beside checkpoints."""
    out = Path(cfg.output)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--output {out} exists and is not a folder")
    found = earlier_run(out)
    if cfg.resume:
        ckpt = resume_point(out)
        if ckpt is None and announce:
            notice(f"notice: --resume: {out} holds no checkpoint yet; training starts from step 0")
        return ckpt
    if found and not cfg.overwrite:
        shown = ", ".join(found[:4]) + (", ..." if len(found) > 4 else "")
        raise ValueError(f"{out} already holds a training run ({shown}): continue it with --resume, train into a "
                         "new --output folder, or give --overwrite to delete it and start over")
    return None


def _clear_run(out: Path) -> None:
    """--overwrite: delete an earlier run's checkpoints, logs and TensorBoard events (nothing else)."""
    for name in _checkpoints(out):
        shutil.rmtree(out / name)
    for p in out.glob(".checkpoint-*.tmp"):
        shutil.rmtree(p, ignore_errors=True)
    for name in (*RUN_FILES, "latest.tmp", "log.jsonl.tmp"):
        (out / name).unlink(missing_ok=True)
    shutil.rmtree(out / "tensorboard", ignore_errors=True)


# ---- plain PyTorch or DeepSpeed, behind one face ----------------------------------------------------
class _Plain:
    rank, world = 0, 1
    adapter = None  # the LoraConfig when LoRA trains

    def __init__(self, model, opt, sched, cfg: TrainConfig):
        self.model, self.opt, self.sched, self.accum = model, opt, sched, cfg.gradient_accumulation_steps

    def backward(self, loss_sum, tokens: int):
        """Backpropagate one micro-batch's summed token loss as its share of the step's mean over all
        `tokens` loss tokens (every micro-batch, every rank): each token weighs the same."""
        (loss_sum / max(tokens, 1)).backward()

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

    def sum(self, values: list[float]) -> list[float]:
        return list(values)

    def gathered(self):
        return contextlib.nullcontext()

    def save_state(self, folder: Path) -> dict:
        return {"optimizer": self.opt.state_dict()}

    def load_state(self, folder: Path, state: dict, start: int) -> None:
        self.load_weights(folder)
        optimizer = state.get("optimizer")
        if not isinstance(optimizer, dict):
            raise ValueError(f"{folder}/trainer_state.pt holds no optimizer state (written by a DeepSpeed run? "
                             "resume it with the same --zero-stage/--nproc)")
        self.opt.load_state_dict(optimizer)
        import warnings

        with warnings.catch_warnings():  # replaying the schedule: no optimizer step belongs before these
            warnings.filterwarnings("ignore", message=".*lr_scheduler.step.*")
            for _ in range(start):
                self.sched.step()

    def load_weights(self, folder: Path) -> None:
        from ..lora import load_adapter_weights, unwrapped

        module = getattr(self.model, "module", self.model)
        if self.adapter is None or (folder / "config.json").exists():  # the base weights, when saved
            fresh = load_model(folder, device=next(module.parameters()).device, dtype=torch.float32)
            with (unwrapped(module) if self.adapter is not None else contextlib.nullcontext()):
                module.load_state_dict(fresh.state_dict())
        if self.adapter is not None:
            load_adapter_weights(module, folder)

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
        """Once every rank is done: unlink this rank's shared-memory all-reduce buffer, which DeepSpeed's
        CPU backend leaves in /dev/shm at exit (64 MiB per rank per run), and end the process group."""
        self.barrier()
        if self.cpu:
            name = f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_" \
                   f"{os.environ.get('MASTER_PORT', '')}_{self.rank}"
            Path("/dev/shm", name).unlink(missing_ok=True)
        # An explicit teardown: a gloo group left to the interpreter's exit can abort the rank
        # ("terminate called without an active exception") after all work is saved.
        self.dist.destroy_process_group()

    def backward(self, loss_sum, tokens: int):
        # The engine would divide by the accumulation steps (scale_wrt_gas=False: it does not) and its
        # gradient all-reduce averages over ranks; scaling by the world size undoes that, so the update is
        # the token-weighted mean over all ranks and micro-batches.
        self.engine.backward(loss_sum * (self.world / max(tokens, 1)), scale_wrt_gas=False)

    def micro_step(self):
        if self.engine.is_gradient_accumulation_boundary():
            # The engine reports no norm without a ZeRO optimizer: measure the reduced gradients before
            # its clipping and update.
            grads = [p.grad for p in self.engine.module.parameters() if p.grad is not None]
            self.norm = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.double())
                                                                    for g in grads]))) if grads else float("nan")
        self.engine.step()  # applies the update at the accumulation boundary only

    def step(self) -> float:
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else getattr(self, "norm", float("nan"))

    def lr(self) -> float:
        return self.engine.get_lr()[0]

    def mean(self, x: float) -> float:
        return self.sum([x])[0] / self.world

    def sum(self, values: list[float]) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64)
        self.dist.all_reduce(t)
        return t.tolist()

    def gathered(self):
        if self.zero3:  # full weights on every rank for the duration (to save them)
            return self.deepspeed.zero.GatheredParameters(list(self.engine.module.parameters()), modifier_rank=None)
        return super().gathered()

    def save_state(self, folder: Path) -> dict:
        # a frozen base is not the run's state: it comes from --model again (or from the model folder)
        self.engine.save_checkpoint(str(folder / "deepspeed"), tag="state",
                                    exclude_frozen_parameters=self.adapter is not None)
        return {}

    def load_state(self, folder: Path, state: dict, start: int) -> None:
        check_deepspeed_files(folder / "deepspeed")  # DeepSpeed itself unpickles them unrestricted
        path, _ = self.engine.load_checkpoint(str(folder / "deepspeed"), tag="state",
                                              load_module_strict=self.adapter is None)
        if path is None:
            raise ValueError(f"{folder}: no DeepSpeed state in {folder / 'deepspeed'} (written by a plain PyTorch "
                             "run? resume it without --zero-stage/--nproc)")

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
def _labels(batch: dict, stage: str) -> torch.Tensor:
    # SFT dialogues attend only within themselves; pre-training blocks are plain causal text (documents
    # separated by <_end>), as in the usual GPT-style recipe and cheaper (no explicit mask).
    seg = batch.get("segment_ids") if stage == "sft" else None
    mask = batch.get("loss_mask") if stage == "sft" else None
    return packed_labels(batch["input_ids"], mask, seg)


def loss_tokens(labels: torch.Tensor) -> int:
    """How many tokens of a batch carry loss (each position predicts the next one's label)."""
    return int((labels[:, 1:] != -100).sum())


def real_tokens(batch: dict) -> int:
    """The non-padding tokens of a batch (padding has segment id 0)."""
    seg = batch.get("segment_ids")
    return int((seg > 0).sum()) if seg is not None else int(batch["input_ids"].numel())


def _loss_sum(model, batch: dict, labels: torch.Tensor, stage: str, precision: str, device: str) -> torch.Tensor:
    """The summed (not averaged) token loss of a batch: 0 with the graph kept when no token carries loss."""
    ids = batch["input_ids"].to(device)
    seg = batch.get("segment_ids") if stage == "sft" else None
    seg = seg.to(device) if seg is not None else None
    with torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16, enabled=precision == "bf16"):
        logits = model(ids, segment_ids=seg)
    return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten().to(device),
                                             ignore_index=-100, reduction="sum")


def _loss(model, batch: dict, stage: str, precision: str, device: str) -> tuple[torch.Tensor, int]:
    """(summed token loss, loss tokens) of a batch."""
    labels = _labels(batch, stage)
    return _loss_sum(model, batch, labels, stage, precision, device), loss_tokens(labels)


@torch.no_grad()
def _held_out_loss(model, val: Batches, cfg: TrainConfig, max_batches: int | None = None) -> tuple[float, int]:
    """Summed token loss and token count over (the first `max_batches` batches of) a held-out set."""
    total, tokens = 0.0, 0
    for b, i in enumerate(range(0, len(val), val.batch_size)):
        if max_batches is not None and b >= max_batches:
            break
        loss_sum, n = _loss(model, val.take(val.rows[i:i + val.batch_size]), cfg.stage, cfg.precision, cfg.device)
        total, tokens = total + float(loss_sum), tokens + n
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


def matmul_params(model: torch.nn.Module) -> int:
    """Parameters that take part in a matmul per token (6 FLOPs each per trained token): all but the input
    embedding table, a lookup, unless it is tied to the output head."""
    n = sum(p.numel() for p in model.parameters())
    emb = getattr(getattr(getattr(model, "transformer", None), "word_embeddings", None), "weight", None)
    head = getattr(getattr(model, "lm_head", None), "weight", None)
    return n - emb.numel() if emb is not None and head is not emb else n


def train(cfg: TrainConfig) -> dict:
    """Run (or resume) training; returns a summary with the per-step history."""
    cfg.check()
    out = Path(cfg.output)
    ckpt = check_output(cfg)
    if ckpt is not None:  # a damaged checkpoint fails before anything is built
        state = load_trainer_state(ckpt)
        check_finite_weights(ckpt)
    train_data, vals, manifest = _datasets(cfg)
    mixture = train_data if isinstance(train_data, Mixture) else None
    mix_every = cfg.mix_every or cfg.eval_steps or 50
    torch.manual_seed(cfg.seed)
    llm = _build(cfg, manifest, train_data, vals)
    adapter = _add_lora(llm, cfg)
    model = llm.model.train()
    model.transformer.gradient_checkpointing = cfg.gradient_checkpointing
    n_matmul = matmul_params(model)  # before DeepSpeed partitions the parameters
    opt = _optimizer(model, cfg)
    per_step = cfg.per_device_batch_size * cfg.gradient_accumulation_steps
    total = cfg.max_steps or max(1, math.ceil(cfg.num_train_epochs * len(train_data) / per_step))
    warmup = int(cfg.warmup_proportion * total)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, total, warmup, cfg.lr_scheduler))
    use_ds = cfg.zero_stage is not None or _world() > 1
    runner = (_DeepSpeed if use_ds else _Plain)(model, opt, sched, cfg)
    runner.adapter = adapter
    runner.barrier()  # every rank has seen the output folder as it was
    lead = runner.rank == 0
    start, history = 0, []
    if ckpt is not None:
        start, history = state["step"], state["history"]
        try:
            runner.load_state(ckpt, state, start)
            if mixture is not None:
                mixture.load_state_dict(state["mixture"] or {"names": None})
            _set_rng_state(state["rng"])
        except (KeyError, TypeError, IndexError, RuntimeError, ValueError) as e:
            raise ValueError(f"{ckpt}: cannot resume from it: {e}") from None
        if start > total:
            raise ValueError(f"{ckpt} is at step {start}, beyond this run's {total} steps: raise --max-steps "
                             "(or --num-train-epochs) to continue it")
        notice(f"resuming from {ckpt} (step {start} of {total})")
    if lead:
        if cfg.overwrite:
            _clear_run(out)
        out.mkdir(parents=True, exist_ok=True)
        _truncate_log(out / "log.jsonl", start)  # the steps after the checkpoint run (and are logged) again
        (out / "train_config.json").write_text(json.dumps(asdict(cfg), indent=2) + "\n")
    runner.barrier()
    log = open(out / "log.jsonl", "a", encoding="utf-8") if lead else None
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
    accum = cfg.gradient_accumulation_steps
    try:
        for step in range(start, total):
            t0 = time.perf_counter()
            lr = runner.lr()  # the rate this step's update uses
            # each rank its own batches of one deterministic stream; all of the step's micro-batches are
            # drawn first, so that the step's loss-token count (all ranks) is known before any backward
            micro_batches = []
            for micro in range(accum):
                batch = train_data.micro_batch(step * accum + micro, runner.rank, runner.world)
                micro_batches.append((batch, _labels(batch, cfg.stage)))
            n_loss, n_real = runner.sum([sum(loss_tokens(lb) for _, lb in micro_batches),
                                         sum(real_tokens(b) for b, _ in micro_batches)])
            n_loss, n_real = int(n_loss), int(n_real)
            loss_sum = 0.0
            for batch, labels in micro_batches:
                loss = _loss_sum(runner.model, batch, labels, cfg.stage, cfg.precision, cfg.device)
                runner.backward(loss, n_loss)
                runner.micro_step()
                loss_sum += float(loss.detach())
            grad_norm = runner.step()
            loss_sum = runner.sum([loss_sum])[0]
            dt = time.perf_counter() - t0
            mean_loss = loss_sum / n_loss if n_loss else float("nan")
            if cfg.precision != "fp16" and n_loss and not math.isfinite(mean_loss):
                raise ValueError(f"step {step + 1}: the loss is {mean_loss} (training diverged; nothing saved from "
                                 f"this step on); lower --learning-rate, or resume from {latest_checkpoint(out)}")
            flops = 6 * n_matmul * n_real / dt
            # the device's peak is the best matmul rate it has shown: measured at the start, or this step's
            peak = max(peak, flops / runner.world)
            rec = {"step": step + 1, "loss": mean_loss, "lr": lr, "grad_norm": grad_norm, "tokens": n_real,
                   "loss_tokens": n_loss, "tokens_per_s": n_real / dt, "flops_per_s": flops,
                   "mfu": flops / (peak * runner.world),
                   "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
            if mixture is not None and cfg.mix == "dynamic" and (step + 1) % mix_every == 0:
                rec["mix_val_loss"] = _measure_sources(runner, vals, cfg)
                mixture.reweight(rec["mix_val_loss"], cfg.mix_eta, cfg.mix_min_weight, cfg.mix_max_weight)
            if mixture is not None and ("mix_val_loss" in rec or step == start):
                rec["mix_weights"] = mixture.weight_dict()  # in force from the next step on
            if vals and ((cfg.eval_steps and (step + 1) % cfg.eval_steps == 0) or step + 1 == total):
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
               "world_size": runner.world, "engine": "deepspeed" if use_ds else "pytorch", "lora": adapter is not None}
    if vals:
        last = history[-1] if history else {}
        summary.update({k: last[k] for k in ("val_loss", "val_ppl", "val_loss_by_source") if k in last}
                       if last.get("step") == total and "val_loss" in last else evaluate(runner.model, vals, cfg))
    if mixture is not None:
        summary["mix_weights"] = mixture.weight_dict()
    runner.close()
    return summary
