"""Training stages train models.lean.LeanTrainLM, not transformers' LlamaForCausalLM: the same bits (losses, metrics,
trained weights, saved files) as the HF-loaded model, no transformers modeling import, and the HF path for what it
does not cover."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from harness import train
from harness.config import Tiny
from harness.models.hf import build_tiny, load
from harness.models.lean import LeanTrainLM, load_for_training, train_config
from tests.test_train import PAIRS, cfg, crash_at_first_save, tok  # noqa: F401 - tok is a fixture

ROOT = Path(__file__).resolve().parents[1]
GQA = Tiny(hidden_size=32, num_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64)
EXAMPLES = [(p["prompt"], p["chosen"]) for p in PAIRS] + [("Sort: 9 1\n", "1 9"), ("x", "a longer answer here")]
VALIDATION = [(p["prompt"], p["rejected"]) for p in PAIRS[:5]]


@pytest.fixture(scope="module")
def ckpt(tok, tmp_path_factory):  # noqa: F811
    path = tmp_path_factory.mktemp("lean") / "m0"
    build_tiny(GQA, tok, seed=4).save(path, {"seed": 4})
    return path


def _pair(path):
    hf, lean = load(path), load_for_training(path)
    assert isinstance(lean.model, LeanTrainLM) and not isinstance(hf.model, LeanTrainLM)
    return hf, lean


def _same_weights(a, b):
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert list(sa) == list(sb)
    bad = [k for k in sa if not torch.equal(sa[k], sb[k])]
    assert not bad, bad


@pytest.mark.parametrize("packed", [True, False])
def test_sft_trains_the_same_bits_as_the_hf_model(ckpt, packed):
    """Packed rows (4D block-diagonal masks, restarted positions) and padded batches (2D masks), validation too."""
    c = cfg("trainer.self_rewarding.val_check_interval=2", "model.optim.weight_decay=0.1")
    hf, lean = _pair(ckpt)
    ha = train.train_sft(hf, EXAMPLES, c, validation=VALIDATION, packed=packed)
    hb = train.train_sft(lean, EXAMPLES, c, validation=VALIDATION, packed=packed)
    assert list(ha) == list(hb) and len(ha) > 4 and any("val/loss" in r for r in ha)
    _same_weights(hf, lean)


@pytest.mark.parametrize("sft_weight", ["0.0", "0.5"])
def test_dpo_trains_the_same_bits_as_the_hf_model(ckpt, sft_weight):
    """Shared-prompt packed pairs, the padded fallback (prompts that differ), the reference pass and validation."""
    pairs = PAIRS + [{**PAIRS[0], "prompt": "another prompt\n"}, {**PAIRS[1], "prompt": ""}]
    c = cfg(f"model.spin.sft_loss_weight={sft_weight}", "trainer.self_rewarding.val_check_interval=2")
    hf, lean = _pair(ckpt)
    ha = train.train_dpo(hf, pairs, c, iteration=1, validation=VALIDATION)
    hb = train.train_dpo(lean, pairs, c, iteration=1, validation=VALIDATION)
    assert list(ha) == list(hb) and len(ha) > 4
    _same_weights(hf, lean)


def test_saved_checkpoint_has_the_bytes_transformers_writes(ckpt, tmp_path):
    hf, lean = _pair(ckpt)
    with torch.no_grad():  # a trained model: weights no longer those of the loaded files
        for a, b in zip(hf.model.parameters(), lean.model.parameters()):
            a.add_(0.25)
            b.add_(0.25)
    hf.save(tmp_path / "hf", {"seed": 4})
    lean.save(tmp_path / "lean", {"seed": 4})
    names = sorted(f.name for f in (tmp_path / "hf").iterdir())
    assert names == sorted(f.name for f in (tmp_path / "lean").iterdir()) and "model.safetensors" in names
    for n in names:
        assert (tmp_path / "hf" / n).read_bytes() == (tmp_path / "lean" / n).read_bytes(), n
    back = load(tmp_path / "lean")  # users load it with transformers
    assert type(back.model).__name__ == "LlamaForCausalLM"
    _same_weights(back, hf)


def test_training_load_never_imports_transformers_modeling(ckpt):
    code = ("import sys; from harness.models.lean import load_for_training as f; "
            f"p = f({str(ckpt)!r}); assert type(p.model).__name__ == 'LeanTrainLM'; "
            "p.model(input_ids=__import__('torch').tensor([[5, 6, 7]])).logits.sum().backward(); "
            "print(sorted(m for m in sys.modules if m.endswith(('modeling_utils', 'modeling_llama', "
            "'configuration_llama', 'masking_utils'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_checkpoints_it_does_not_cover_train_on_transformers(ckpt, tmp_path):
    raw = json.loads((ckpt / "config.json").read_text())
    assert train_config(raw) is not None
    for other in ({"model_type": "qwen2"}, {"attention_dropout": 0.1}, {"hidden_act": "gelu"}):
        assert train_config({**raw, **other}) is None
    d = tmp_path / "mistral"
    d.mkdir()
    for f in ckpt.iterdir():
        (d / f.name).write_bytes(f.read_bytes())
    (d / "config.json").write_text(json.dumps({**raw, "model_type": "mistral", "architectures": ["MistralForCausalLM"]}))
    assert type(load_for_training(d).model).__name__ == "MistralForCausalLM"


def test_sft_stage_never_imports_transformers_modeling(tmp_path):
    """The whole sft stage (load, train, validate, save) in a fresh process: no transformers modeling import."""
    from harness import config, stages

    over = ["model.sft.max_epochs=1", "world.num_ift=8", "world.num_eft=8", "world.num_mft=8", "tracking.enabled=false"]
    smoke = str(ROOT / "experiments/smoke.yaml")
    lay = stages.Layout(tmp_path)
    stages.prepare(config.load(smoke, over, warn=None), lay)
    code = ("import sys; from harness import config, stages; "
            f"cfg = config.load({smoke!r}, {over!r}, warn=None); "
            f"stages.run_sft(cfg, stages.Layout(__import__('pathlib').Path({str(tmp_path)!r}))); "
            "print(sorted(m for m in sys.modules if m.endswith(('modeling_utils', 'modeling_llama', "
            "'configuration_llama', 'masking_utils'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "[]"
    assert type(load(lay.model(0)).model).__name__ == "LlamaForCausalLM"  # its checkpoint: a transformers Llama


def test_lean_dpo_resumes_after_a_crash_to_the_uninterrupted_bits(ckpt, tmp_path, monkeypatch):
    """The resume state (weights with a tied head, optimizer) round-trips through LeanTrainLM: a crash after the
    first save point, then a fresh load, ends on the bits of an uninterrupted run of the HF model."""
    c = cfg("trainer.self_rewarding.save_interval=2")
    ref = load(ckpt)
    whole = train.train_dpo(ref, PAIRS, c, iteration=1)
    crash_at_first_save(load_for_training(ckpt), c, tmp_path / "r", monkeypatch)
    resumed = load_for_training(ckpt)
    h = train.train_dpo(resumed, PAIRS, c, iteration=1, resume_dir=tmp_path / "r")
    assert h.resumed_from == 2 and list(h) == list(whole)
    _same_weights(ref, resumed)
