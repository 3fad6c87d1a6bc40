"""The lm-evaluation-harness model "telechat" on local YAML tasks: its log-likelihoods, rolling
log-likelihoods and generations equal plain forwards / greedy decoding of the same model."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import telechat

lm_eval = pytest.importorskip("lm_eval")

DOCS_MC = [{"question": "The quick brown fox", "choices": ["jumps", "sleeps", "eats a cake"], "label": 0},
           {"question": "今天天气很好，我们去", "choices": ["公园", "上海", "散步吧"], "label": 2}]
DOCS_TEXT = ["Large language models generate text one token at a time.", "北京是中国的首都。"]
DOCS_GEN = [{"q": "Numbers like 2024 and", "a": "x"}, {"q": "你好，", "a": "y"}]


def write_tasks(d) -> str:
    d.mkdir(parents=True, exist_ok=True)
    (d / "mc.jsonl").write_text("".join(json.dumps(x, ensure_ascii=False) + "\n" for x in DOCS_MC), encoding="utf-8")
    (d / "text.jsonl").write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in DOCS_TEXT),
                                  encoding="utf-8")
    (d / "gen.jsonl").write_text("".join(json.dumps(x, ensure_ascii=False) + "\n" for x in DOCS_GEN), encoding="utf-8")
    common = "dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {}\ntest_split: test\n"
    (d / "tc_mc.yaml").write_text(
        "task: tc_mc\n" + common.format(d / "mc.jsonl") + "output_type: multiple_choice\n"
        "doc_to_text: \"{{question}}\"\ndoc_to_choice: \"{{choices}}\"\ndoc_to_target: label\n"
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n")
    (d / "tc_ppl.yaml").write_text(
        "task: tc_ppl\n" + common.format(d / "text.jsonl") + "output_type: loglikelihood_rolling\n"
        "doc_to_text: \"\"\ndoc_to_target: \"{{text}}\"\n"
        "metric_list:\n  - metric: word_perplexity\n  - metric: bits_per_byte\n")
    (d / "tc_gen.yaml").write_text(
        "task: tc_gen\n" + common.format(d / "gen.jsonl") + "output_type: generate_until\n"
        "doc_to_text: \"{{q}}\"\ndoc_to_target: \"{{a}}\"\n"
        "generation_kwargs:\n  until: [\"。\", \"\\n\"]\n  max_gen_toks: 6\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n")
    return str(d)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, sp_tokenizer):
    llm = telechat.from_preset("tiny", seed=1, tokenizer=sp_tokenizer, seq_length=256, training_seqlen=256,
                               base_seqlen=256)
    with torch.no_grad():  # varied, context-dependent outputs
        for n, p in llm.model.named_parameters():
            if n.endswith("weight") and "norm" not in n and "ln_f" not in n:
                p.mul_(8)
    d = tmp_path_factory.mktemp("lmeval_model")
    llm.save(d)
    return d


def _ref_loglik(llm, ctx_ids, cont_ids):
    logp = F.log_softmax(llm.model(torch.tensor([ctx_ids + cont_ids]))[0].double(), -1)
    rows = logp[len(ctx_ids) - 1: len(ctx_ids) - 1 + len(cont_ids)]
    return float(rows.gather(1, torch.tensor(cont_ids)[:, None]).sum())


def test_adapter_matches_plain_computation(model_dir, tmp_path):
    import telechat.eval.lm_eval_adapter  # noqa: F401  (registers "telechat")
    from lm_eval.tasks import TaskManager

    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    res = lm_eval.simple_evaluate(model="telechat", model_args=f"pretrained={model_dir}",
                                  tasks=["tc_mc", "tc_ppl", "tc_gen"], batch_size=2, log_samples=True,
                                  task_manager=TaskManager(include_path=write_tasks(tmp_path / "tasks")))
    llm = telechat.load(model_dir)
    tok = llm.tokenizer
    with torch.no_grad():
        for s in res["samples"]["tc_mc"]:
            doc = s["doc"]
            ctx = tok.encode(doc["question"])
            for choice, resp in zip(doc["choices"], s["resps"]):
                whole = tok.encode(doc["question"] + " " + choice)
                assert resp[0][0] == pytest.approx(_ref_loglik(llm, ctx, whole[len(ctx):]), abs=1e-4)
        for s in res["samples"]["tc_ppl"]:
            ids = tok.encode(s["doc"]["text"])
            want = _ref_loglik(llm, [tok.bos_id], ids)  # whole text after the prefix token
            assert s["resps"][0][0] == pytest.approx(want, abs=1e-4)
        for s in res["samples"]["tc_gen"]:
            prompt = tok.encode(s["doc"]["q"])
            out = llm.generate(prompt, max_new_tokens=6, eos_token_id=[tok.eos_id, tok.user_id], repetition_penalty=1.0)
            text = tok.decode(out[0, len(prompt):].tolist())
            for stop in ("。", "\n"):
                text = text.split(stop)[0]
            assert s["resps"][0][0] == text
    acc = res["results"]["tc_mc"]["acc,none"]
    assert 0.0 <= acc <= 1.0 and res["results"]["tc_ppl"]["word_perplexity,none"] > 1


def telechat_lm_eval_command() -> list[str]:
    """The `telechat-lm-eval` console script (lm-eval's command line with "telechat" registered)."""
    exe = shutil.which("telechat-lm-eval", path=os.pathsep.join([os.path.dirname(sys.executable),
                                                                  os.environ.get("PATH", "")]))
    assert exe, "the telechat-lm-eval console script is not installed (reinstall the package)"
    return [exe]


@pytest.mark.slow
@pytest.mark.parametrize("command", ["script", "module"])
def test_lm_eval_command_line(model_dir, tmp_path, command):
    tasks = write_tasks(tmp_path / "tasks")
    out = tmp_path / "out"
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    argv = telechat_lm_eval_command() if command == "script" else [sys.executable, "-m", "telechat.eval.lm_eval_adapter"]
    proc = subprocess.run([*argv, "--model", "telechat",
                           "--model_args", f"pretrained={model_dir}", "--tasks", "tc_mc", "--include_path", tasks,
                           "--batch_size", "2", "--output_path", str(out)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = list(out.rglob("results_*.json"))
    assert results, proc.stdout[-2000:]
    data = json.loads(results[0].read_text())
    assert "acc,none" in data["results"]["tc_mc"] and data["config"]["model"] == "telechat"


def run_python(code: str) -> list[str]:
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout.split()


def test_no_startup_hook():
    """Installing the package runs no code in other interpreters: no telechat module is loaded at start
    and no `.pth` of ours sits in site-packages; lm-eval alone does not know "telechat"."""
    code = ("import sys; print(sorted(m for m in sys.modules if 'telechat' in m and '__editable__' not in m) "
            "or 'none', 'torch' in sys.modules, 'lm_eval' in sys.modules)")
    assert run_python(code) == ["none", "False", "False"]
    code = ("import site, glob, os; print([p for d in site.getsitepackages() + [site.getusersitepackages()] "
            "for p in glob.glob(os.path.join(d, '*.pth')) if 'telechat' in open(p).read() and "
            "'__editable__' not in p] or 'none')")
    assert run_python(code) == ["none"]


def test_explicit_registration():
    """Importing the adapter registers the model with lm-eval (what `telechat-lm-eval` and
    `python -m telechat.eval.lm_eval_adapter` do before handing over to lm-eval's command line)."""
    code = ("from lm_eval.api.registry import get_model\n"
            "try:\n    get_model('telechat'); print('known')\nexcept ValueError:\n    print('unknown')\n"
            "import telechat.eval.lm_eval_adapter\n"
            "cls = get_model('telechat'); print(cls.__module__, cls.__name__, get_model('hf').__name__)")
    assert run_python(code) == ["unknown", "telechat.eval.lm_eval_adapter", "TeleChatLM", "HFLM"]
