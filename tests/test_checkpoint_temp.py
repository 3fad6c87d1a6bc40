"""Temporary folders of imports, quantizations and exports: named after their owner, removed when a
killed run left them, and outputs created with the umask's modes (like mkdir), not mkdtemp's 0700."""
from __future__ import annotations

import json
import os
import select
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import telechat
from telechat.checkpoint import is_stale_temp, make_temp_dir, remove_stale_temps, temp_name
from telechat.convert import export_vllm, import_model
from telechat.quant import QuantConfig, quantize

QUANT_ARGS = ["--method", "rtn", "--group-size", "16", "--quiet"]
# A real CLI run whose first weight file write stalls after the file is written: the test kills it there.
STALLED = """
import sys, time
import safetensors.torch
import telechat.checkpoint
real = safetensors.torch.save_file
def stalled(tensors, filename, metadata=None):
    real(tensors, filename, metadata=metadata)
    print("WRITTEN", filename, flush=True)
    time.sleep(600)
telechat.checkpoint.save_file = stalled
from telechat.cli import main
sys.exit(main(sys.argv[1:]))
"""
RUN = "import sys; from telechat.cli import main; sys.exit(main(sys.argv[1:]))"


@pytest.fixture(scope="module")
def float_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("float") / "tiny"
    telechat.from_preset("tiny", seed=0).save(d)
    return d


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    """A one-layer LLaMA folder in HF's layout, written directly (no transformers needed)."""
    d = tmp_path_factory.mktemp("hf") / "llama"
    d.mkdir()
    H, F, V, KV = 32, 48, 64, 16
    g = torch.Generator().manual_seed(0)
    shapes = {"model.embed_tokens.weight": (V, H), "lm_head.weight": (V, H), "model.norm.weight": (H,),
              "model.layers.0.self_attn.q_proj.weight": (H, H), "model.layers.0.self_attn.k_proj.weight": (KV, H),
              "model.layers.0.self_attn.v_proj.weight": (KV, H), "model.layers.0.self_attn.o_proj.weight": (H, H),
              "model.layers.0.mlp.gate_proj.weight": (F, H), "model.layers.0.mlp.up_proj.weight": (F, H),
              "model.layers.0.mlp.down_proj.weight": (H, F), "model.layers.0.input_layernorm.weight": (H,),
              "model.layers.0.post_attention_layernorm.weight": (H,)}
    save_file({k: torch.randn(s, generator=g) for k, s in shapes.items()}, str(d / "model.safetensors"))
    (d / "config.json").write_text(json.dumps({
        "model_type": "llama", "vocab_size": V, "hidden_size": H, "num_hidden_layers": 1, "num_attention_heads": 4,
        "num_key_value_heads": 2, "intermediate_size": F, "max_position_embeddings": 64, "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False}))
    return d


def temps(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if ".telechat-tmp." in p.name)


def kill_when_written(args: list[str], cwd: Path) -> None:
    """Run `telechat ARGS` with its first weight write stalled, SIGKILL it there, and wait for it."""
    proc = subprocess.Popen([sys.executable, "-c", STALLED, *args], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 300)
        line = proc.stdout.readline() if ready else ""
        assert line.startswith("WRITTEN"), (line, proc.poll(), proc.stderr.read() if proc.poll() is not None else "")
        assert Path(line.split(" ", 1)[1].strip()).stat().st_size > 0
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        proc.stdout.close()
        proc.stderr.close()


def run_cli(args: list[str], cwd: Path) -> None:
    r = subprocess.run([sys.executable, "-c", RUN, *args], cwd=cwd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr


@pytest.mark.slow
def test_killed_quantize_leaves_nothing_after_the_next_run(float_dir, tmp_path):
    out = tmp_path / "q"
    args = ["quantize", "--model", str(float_dir), "--output", str(out), *QUANT_ARGS]
    kill_when_written(args, tmp_path)
    left = temps(tmp_path)
    assert len(left) == 1 and left[0].is_dir() and any(left[0].iterdir()), left  # what the kill left
    assert not out.exists()
    assert str(os.getpid()) not in left[0].name  # named after the killed process
    run_cli(args, tmp_path)
    assert temps(tmp_path) == []
    assert temps(out) == []
    assert telechat.load(out).config.extra["quantization_config"]["bits"] == 4


@pytest.mark.slow
def test_killed_import_is_cleaned_by_the_next_command_in_that_folder(hf_dir, float_dir, tmp_path):
    kill_when_written(["import", str(hf_dir), "--output", str(tmp_path / "imported"), "--quiet"], tmp_path)
    first = temps(tmp_path)
    assert len(first) == 1 and (first[0] / "model.safetensors").stat().st_size > 0
    # Any later import or quantization into the same parent folder removes what a killed one left.
    kill_when_written(["import", str(hf_dir), "--output", str(tmp_path / "again"), "--quiet"], tmp_path)
    second = temps(tmp_path)
    assert len(second) == 1 and second != first
    run_cli(["quantize", "--model", str(float_dir), "--output", str(tmp_path / "q"), *QUANT_ARGS], tmp_path)
    assert temps(tmp_path) == []
    assert not (tmp_path / "imported").exists() and (tmp_path / "q" / "config.json").exists()


def test_stale_temps_only_of_dead_owners(tmp_path):
    mine = make_temp_dir(tmp_path, "out")  # this (live) process's
    assert mine.name.startswith(".out.telechat-tmp.") and mine.is_dir()
    (mine / "model.safetensors").write_bytes(b"x" * 100)
    dead = subprocess.Popen(["true"])
    dead.wait()
    start = int(mine.name.split(".")[4])
    live_pid_other_start = tmp_path / mine.name.replace(f".{start}.", f".{start + 12345}.", 1)
    dead_pid = tmp_path / mine.name.replace(f".{os.getpid()}.", f".{dead.pid}.", 1)
    other_host = tmp_path / (mine.name.rsplit(".", 1)[0] + ".another-host-xyz")
    stale_file = tmp_path / temp_name("model.safetensors").replace(f".{os.getpid()}.", f".{dead.pid}.", 1)
    unrelated = [tmp_path / ".cache", tmp_path / "out.abc123", tmp_path / ".out.telechat-tmp.notours"]
    for p in (live_pid_other_start, dead_pid, other_host, *unrelated):
        p.mkdir()
        (p / "f").write_text("x")
    stale_file.write_bytes(b"partial")
    assert not is_stale_temp(mine)
    if Path("/proc/self/stat").exists():  # pid reuse is told apart by the start time
        assert is_stale_temp(live_pid_other_start)
    removed = remove_stale_temps(tmp_path)
    assert dead_pid in removed and stale_file in removed
    assert not dead_pid.exists() and not stale_file.exists()
    for p in (mine, other_host, *unrelated):
        assert p.exists(), p
    assert (mine / "model.safetensors").stat().st_size == 100


def test_save_model_removes_a_killed_save_temp(tmp_path):
    llm = telechat.from_preset("tiny")
    llm.save(tmp_path)
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = tmp_path / temp_name("model.safetensors").replace(f".{os.getpid()}.", f".{dead.pid}.", 1)
    stale.write_bytes(b"partial")
    llm.save(tmp_path)
    assert not stale.exists()
    assert temps(tmp_path) == []


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


@pytest.mark.parametrize("umask,dir_mode,file_mode", [(0o022, 0o755, 0o644), (0o027, 0o750, 0o640)],
                         ids=["umask-022", "umask-027"])
def test_outputs_get_the_umask_modes(umask, dir_mode, file_mode, float_dir, hf_dir, tmp_path):
    old = os.umask(umask)
    try:
        outs = {
            "import": import_model(hf_dir, tmp_path / "imported", progress=False),
            "quantize": quantize(float_dir, tmp_path / "quantized", QuantConfig(bits=4, group_size=16, method="rtn"),
                                 progress=False),
            "export": export_vllm(float_dir, tmp_path / "exported"),
            "save": telechat.load(float_dir).save(tmp_path / "nested" / "saved"),
        }
    finally:
        os.umask(old)
    for what, out in outs.items():
        assert _mode(out) == dir_mode, (what, oct(_mode(out)))
        files = [f for f in out.iterdir() if f.is_file()]
        assert files and all(_mode(f) == file_mode for f in files), (what, {f.name: oct(_mode(f)) for f in files})
    assert _mode(tmp_path / "nested") == dir_mode


def test_unwritable_output_is_a_one_line_error(float_dir, tmp_path, capsys):
    from telechat.cli import main

    (tmp_path / "file.txt").write_text("not a folder")
    rc = main(["quantize", "--model", str(float_dir), "--output", str(tmp_path / "file.txt" / "q"), *QUANT_ARGS])
    err = capsys.readouterr().err
    assert rc == 1 and err.startswith("error: ") and err.count("\n") == 1 and "file.txt" in err, err
    assert temps(tmp_path) == []
