"""`telechat eval` end to end on fixture data, with a model whose next-token distribution is set by
hand (the same whatever the context), so that every score, prediction and average is known."""
from __future__ import annotations

import json
import math

import pytest
import torch

import telechat
from telechat.cli import main
from telechat.eval import EvalConfig, evaluate
from telechat.eval.data import DataError

from test_eval_data import write_eval_fixtures

ALL_TASKS = "mmlu,ceval,cmmlu,hellaswag,chid,csl,eprstmt,agieval,gaokao,gsm8k,bbh,math,humaneval,wikitext2"


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices on a shared machine
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_eval_fixtures(tmp_path_factory.mktemp("evaldata"))


def fixed_distribution_llm(tokenizer, logits: torch.Tensor) -> telechat.LLM:
    """A real TeleChat whose blocks add nothing and whose embeddings are all equal, so the last
    hidden state is one constant vector u; lm_head rows logits[t] * u / |u|^2 then make the
    next-token logits exactly `logits` after any context."""
    llm = telechat.from_preset("tiny", seed=0, tokenizer=tokenizer, seq_length=512, training_seqlen=512,
                               base_seqlen=512)
    m = llm.model
    with torch.no_grad():
        for block in m.transformer.h:
            for lin in (block.self_attention.dense, block.mlp.down_proj):
                lin.weight.zero_()
                if lin.bias is not None:
                    lin.bias.zero_()
        e = torch.randn(m.config.hidden_size, generator=torch.Generator().manual_seed(0))
        m.transformer.word_embeddings.weight.copy_(e.expand_as(m.transformer.word_embeddings.weight))
        u = m.transformer(torch.tensor([[5]]))[0, 0]
        m.lm_head.weight.copy_(logits[:, None] * u[None] / (u @ u))
    llm.generation_config.update({"max_length": 512, "repetition_penalty": 1.0})
    return llm


@pytest.fixture(scope="module")
def favours_b(sp_tokenizer):
    """Next token is always most likely the byte 'B' (then the digit '9')."""
    logits = torch.zeros(512)
    b = sp_tokenizer.token_to_id("<0x42>")
    logits[b] = 6.0
    logits[sp_tokenizer.token_to_id("9")] = 3.0
    return fixed_distribution_llm(sp_tokenizer, logits), torch.log_softmax(logits.double(), -1)


@pytest.fixture(scope="module")
def favours_9(sp_tokenizer):
    logits = torch.zeros(512)
    logits[sp_tokenizer.token_to_id("9")] = 6.0
    return fixed_distribution_llm(sp_tokenizer, logits)


def cont_ids(tok, ctx: str, cont: str) -> list[int]:
    whole, head = tok.encode(ctx + cont), tok.encode(ctx)
    assert whole[:len(head)] == head
    return whole[len(head):]


def test_the_model_really_ignores_context(favours_b):
    llm, logp = favours_b
    out = torch.log_softmax(llm.model(torch.tensor([[7, 100, 200, 9, 33]]))[0].double(), -1)
    assert torch.allclose(out, logp.expand_as(out), atol=1e-5)


def test_mmlu_loglik_known_answers(favours_b, data_dir):
    llm, logp = favours_b
    tok = llm.tokenizer
    r = evaluate(llm, EvalConfig(tasks=["mmlu"], data_dir=str(data_dir), progress=False))["results"]["mmlu"]
    # " B" is always the most likely option: right on 2 of 4 abstract_algebra items and 2 of 2 anatomy items
    assert [it["pred"] for it in r["items"]] == [1] * 6
    assert r["subjects"] == {"abstract_algebra": {"n": 4, "acc": 0.5}, "anatomy": {"n": 2, "acc": 1.0}}
    assert r["metrics"]["acc_macro"] == pytest.approx(0.75) and r["metrics"]["acc_micro"] == pytest.approx(4 / 6)
    assert r["categories"]["STEM"]["n"] == 4 and r["categories"]["other"]["micro"] == 1.0
    want = [float(sum(logp[t] for t in cont_ids(tok, "Answer:", f" {L}"))) for L in "ABCD"]
    for it in r["items"]:
        assert it["loglik"] == pytest.approx(want, abs=1e-4)
    assert r["shots"] == 5 and r["shots_from"] == "dev" and r["engine"]["prefix_tokens"] > 0


def test_hellaswag_acc_and_acc_norm(favours_b, data_dir):
    llm, logp = favours_b
    tok = llm.tokenizer
    r = evaluate(llm, EvalConfig(tasks=["hellaswag"], data_dir=str(data_dir), progress=False))["results"]["hellaswag"]
    from telechat.eval.data import load_hellaswag

    items = load_hellaswag(data_dir / "hellaswag")
    n_acc = n_norm = 0
    for it, rec in zip(items, r["items"]):
        scores = [float(sum(logp[t] for t in cont_ids(tok, it.question, e))) for e in it.choices]
        assert rec["loglik"] == pytest.approx(scores, abs=1e-4)
        best = max(range(4), key=lambda i: scores[i])
        best_norm = max(range(4), key=lambda i: scores[i] / len(it.choices[i]))
        assert (rec["pred"], rec["pred_norm"]) == (best, best_norm)
        n_acc += best == it.answer
        n_norm += best_norm == it.answer
    assert r["metrics"]["acc_micro"] == pytest.approx(n_acc / 3)
    assert r["metrics"]["acc_norm_micro"] == pytest.approx(n_norm / 3)
    assert r["metrics"]["acc_norm_micro"] != r["metrics"]["acc_micro"]  # the fixture makes them differ


def test_generate_mode_uses_chat_turns_and_extracts_letters(favours_b, data_dir):
    llm, _ = favours_b
    rep = evaluate(llm, EvalConfig(tasks=["mmlu", "ceval"], data_dir=str(data_dir), mode="generate",
                                   max_new_tokens=4, progress=False))
    r = rep["results"]["mmlu"]
    assert all(it["output"] == "BBBB" and it["pred"] == "B" for it in r["items"])
    assert r["metrics"]["acc_micro"] == pytest.approx(4 / 6) and r["mode"] == "generate"
    assert rep["results"]["ceval"]["metrics"]["acc_micro"] == 1.0  # every C-Eval fixture answer is B
    assert rep["settings"]["prompt_style_used"] == "chat"


def test_gsm8k_chain_of_thought_exact_match(favours_9, data_dir):
    rep = evaluate(favours_9, EvalConfig(tasks=["gsm8k"], data_dir=str(data_dir), max_new_tokens=3, progress=False))
    r = rep["results"]["gsm8k"]
    assert r["shots"] == 4 and r["shots_from"] == "train"
    assert r["items"][0]["output"] == "999" and r["items"][0]["pred"] == "999" and r["items"][0]["correct"]
    plain = evaluate(favours_9, EvalConfig(tasks=["gsm8k"], data_dir=str(data_dir), max_new_tokens=4,
                                           prompt_style="plain", progress=False))["results"]["gsm8k"]
    assert plain["items"][0]["pred"] == "9999" and not plain["items"][0]["correct"]


def test_wikitext_perplexity_is_exact_for_any_stride(favours_b, data_dir):
    llm, logp = favours_b
    tok = llm.tokenizer
    from telechat.eval.data import load_wikitext

    arts = load_wikitext(data_dir / "wikitext2")
    nll = sum(-float(sum(logp[t] for t in tok.encode(a.question))) for a in arts)
    ntok = sum(len(tok.encode(a.question)) for a in arts)
    words = sum(len(a.question.split()) for a in arts)
    for max_length, stride in ((64, 64), (64, 16), (512, 256)):
        r = evaluate(llm, EvalConfig(tasks=["wikitext2"], data_dir=str(data_dir), max_length=max_length,
                                     stride=stride, progress=False))["results"]["wikitext2"]
        assert r["metrics"]["token_perplexity"] == pytest.approx(math.exp(nll / ntok), rel=1e-4)
        assert r["metrics"]["word_perplexity"] == pytest.approx(math.exp(nll / words), rel=1e-4)
        assert r["details"]["tokens"] == ntok and r["details"]["stride"] == stride


def test_humaneval_sampling_and_pass_at_k(favours_b, data_dir):
    llm, _ = favours_b
    r = evaluate(llm, EvalConfig(tasks=["humaneval"], data_dir=str(data_dir), samples=3, pass_k=[1, 2],
                                 max_new_tokens=8, timeout=5, progress=False))["results"]["humaneval"]
    assert r["n"] == 2 and all(len(it["samples"]) == 3 for it in r["items"])
    assert r["metrics"] == {"pass@1": 0.0, "pass@2": 0.0}  # "BBBB..." is not a function body
    assert sum(r["details"]["statuses"].values()) == 6


def test_cli_runs_every_task(tiny_dir, data_dir, tmp_path, capsys):
    out = tmp_path / "report.json"
    rc = main(["eval", "--model", str(tiny_dir), "--data-dir", str(data_dir), "--tasks", ALL_TASKS,
               "--limit", "2", "--batch-size", "3", "--max-new-tokens", "4", "--output", str(out), "--no-progress"])
    assert rc == 0
    table = capsys.readouterr().out
    assert table.startswith("| task | mode | shots | n | metric | value |")
    rep = json.loads(out.read_text())
    assert set(rep["results"]) == set(ALL_TASKS.split(","))
    s = rep["settings"]
    for key in ("tasks", "data_dir", "shots", "limit", "batch_size", "mode", "share_prefix", "prompt_style",
                "max_new_tokens", "samples", "pass_k", "seed", "max_length", "stride", "timeout", "memory_mb",
                "started", "finished", "torch"):
        assert key in s
    assert s["limit"] == 2 and s["batch_size"] == 3 and rep["model"]["layers"] == 2
    for name, r in rep["results"].items():
        assert r["n"] + r["skipped"] == len(r["items"]) > 0, name
        assert f"| {name} |" in table
    assert rep["results"]["mmlu"]["n"] == 4  # 2 per subject
    assert rep["results"]["bbh"]["shots"] == 3 and rep["results"]["math"]["shots_from"] == "train"
    assert rep["results"]["agieval"]["skipped"] == 1  # the cloze item needs generate mode
    assert "| mmlu | STEM |" in table and "| bbh | boolean_expressions |" in table


def test_cli_generate_mode_scores_cloze(tiny_dir, data_dir, tmp_path):
    out = tmp_path / "r.json"
    assert main(["eval", "--model", str(tiny_dir), "--data-dir", str(data_dir), "--tasks", "agieval,cmmlu,chid",
                 "--mode", "generate", "--max-new-tokens", "3", "--output", str(out), "--no-progress"]) == 0
    rep = json.loads(out.read_text())
    ag = rep["results"]["agieval"]
    assert ag["skipped"] == 0 and ag["n"] == 4 and all("output" in it for it in ag["items"])


def test_bad_settings(tiny_dir, data_dir, tmp_path, capsys):
    assert main(["eval", "--model", str(tiny_dir), "--data-dir", str(data_dir), "--tasks", "mmlu,nope"]) == 1
    assert "unknown task 'nope'" in capsys.readouterr().err
    assert main(["eval", "--model", str(tiny_dir), "--data-dir", str(tmp_path), "--tasks", "gsm8k"]) == 1
    assert "gsm8k data not found" in capsys.readouterr().err
    assert main(["eval", "--model", str(tiny_dir), "--data-dir", str(data_dir), "--tasks", "mmlu", "--shots", "7",
                 "--no-progress"]) == 1
    assert "7-shot needs 7 examples per subject, but abstract_algebra has 5" in capsys.readouterr().err
    assert main(["eval", "--data-dir", str(data_dir), "--tasks", "humaneval", "--samples", "2",
                 "--pass-k", "1,5"]) == 1
    assert "pass@k needs 1 <= k <= samples (2), got k=[5]" in capsys.readouterr().err
    with pytest.raises(DataError, match="is not a folder"):
        EvalConfig(tasks=["mmlu"], data_dir=str(tmp_path / "missing")).validate()
    with pytest.raises(SystemExit):
        main(["eval", "--data-dir", str(data_dir), "--mode", "guess"])


@pytest.mark.slow
def test_default_model_on_shared_mmlu_sharing_changes_nothing(default_llm):
    from conftest import shared_path

    root = shared_path("data", "eval")
    cfg = dict(tasks=["mmlu", "hellaswag"], data_dir=str(root), limit=3, subjects=["abstract_algebra", "hellaswag"],
               progress=False)
    a = evaluate(default_llm, EvalConfig(**cfg))["results"]
    b = evaluate(default_llm, EvalConfig(**cfg, share_prefix=False, batch_size=1))["results"]
    for task in ("mmlu", "hellaswag"):
        for x, y in zip(a[task]["items"], b[task]["items"]):
            assert x["loglik"] == pytest.approx(y["loglik"], abs=2e-3)
    assert a["mmlu"]["engine"]["tokens_computed"] < b["mmlu"]["engine"]["tokens_computed"] / 2
