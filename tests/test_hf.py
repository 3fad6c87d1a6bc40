"""transformers interop: saved folders load through the Auto classes (remote code, and native registration
when asked for: `import telechat` itself registers nothing)."""
import json
import subprocess
import sys

import pytest
import torch

import telechat

pytest.importorskip("transformers")

REMOTE = """
import sys, torch
sys.modules["telechat"] = None  # the folder must work without telechat installed
from transformers import AutoModelForCausalLM, AutoTokenizer
folder, text = sys.argv[1], sys.argv[2]
model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
ids = tok(text)["input_ids"]
with torch.no_grad():
    logits = model(torch.tensor([ids])).logits
torch.save({"ids": ids, "logits": logits, "module": type(model).__module__}, folder + "/remote.pt")
"""


def _saved(tmp_path, tokenizer, **overrides):
    llm = telechat.from_preset("small", seed=1, tokenizer=tokenizer, **overrides)
    with torch.no_grad():
        for name, p in llm.model.named_parameters():
            if name.endswith("bias"):
                p.normal_(std=0.1)
    return llm, llm.save(tmp_path / "saved")


@pytest.mark.parametrize("kind", ["sentencepiece", "tokenizer.json"])
def test_saved_folder_loads_with_trust_remote_code(tmp_path, kind, sp_model, hf_tokenizer_json):
    tok = telechat.load_tokenizer(sp_model if kind == "sentencepiece" else hf_tokenizer_json)
    llm, folder = _saved(tmp_path, tok, vocab_size=tok.vocab_size, num_key_value_heads=4,
                         tie_word_embeddings=kind == "sentencepiece")
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["auto_map"]["AutoModelForCausalLM"] == "modeling_telechat.TelechatForCausalLM"
    assert (folder / "telechat_model.py").exists() and (folder / "modeling_telechat.py").exists()
    text = "今天天气很好 hello 2024"
    r = subprocess.run([sys.executable, "-c", REMOTE, str(folder), text], capture_output=True, text=True,
                       cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    out = torch.load(folder / "remote.pt")
    assert out["module"].startswith("transformers_modules")  # the folder's own code, not telechat's
    assert out["ids"] == tok.encode(text)
    with torch.no_grad():
        ref = llm.model(torch.tensor([out["ids"]]))
    assert torch.allclose(out["logits"], ref, atol=1e-5, rtol=1e-5)


def test_auto_classes_resolve_telechat_when_registered(tmp_path, sp_model):
    from transformers import AutoConfig, AutoModelForCausalLM

    from telechat.hf import register_auto_classes

    register_auto_classes()
    register_auto_classes()  # twice is harmless
    llm, folder = _saved(tmp_path, telechat.load_tokenizer(sp_model), vocab_size=512)
    config = AutoConfig.from_pretrained(folder)  # no trust_remote_code: registered natively
    assert type(config).__module__ == "telechat.hf_remote.configuration_telechat"
    assert config.num_hidden_layers == llm.config.n_layer
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    ids = torch.randint(0, 512, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, llm.model(ids))
        out = model.generate(ids[:1, :6], max_new_tokens=6, do_sample=False, eos_token_id=None,
                             pad_token_id=0)
    assert torch.equal(out, llm.generate(ids[:1, :6], max_new_tokens=6, eos_token_id=-1, repetition_penalty=1.0))


def run_python(code: str) -> list[str]:
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout.split()


REGISTERED = ("from transformers.models.auto.configuration_auto import CONFIG_MAPPING\n"
              "print('telechat' in CONFIG_MAPPING)")


def test_import_telechat_has_no_side_effects():
    """`import telechat` adds no import hook and loads neither transformers nor lm-eval; saving a model
    (which writes the remote code) registers nothing either."""
    code = ("import sys\nhooks = list(sys.meta_path), list(sys.path_hooks)\nimport telechat\n"
            "print(hooks == (sys.meta_path, sys.path_hooks), 'transformers' in sys.modules, 'lm_eval' in sys.modules)\n"
            "import tempfile\ntelechat.from_preset('tiny', seed=0).save(tempfile.mkdtemp())\n"
            "print(hooks == (sys.meta_path, sys.path_hooks), 'transformers' in sys.modules)\n"
            "import transformers\n" + REGISTERED)
    assert run_python(code) == ["True", "False", "False", "True", "False", "False"]


@pytest.mark.parametrize("how", [
    "import telechat.hf_remote",
    "from telechat.hf import register_auto_classes; register_auto_classes()",
    # lazily: registers once transformers is imported, without importing it now
    "from telechat.hf import install_auto_registration; install_auto_registration()\n"
    "assert 'transformers' not in sys.modules\nimportlib.util.find_spec('transformers')",
])
def test_explicit_auto_registration(how):
    assert run_python(f"import importlib.util, sys, telechat\n{how}\nimport transformers\n{REGISTERED}") == ["True"]
