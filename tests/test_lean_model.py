"""Generation stages load a checkpoint without transformers' modeling code (generation.lean_model): same weights,
same bits as the HF-loaded model, and checkpoints it does not cover go through the full loader."""

import json
import subprocess
import sys

import pytest
import torch

from harness.config import LengthParams, SamplingParams, Tiny
from harness.generation import generate
from harness.generation.lean_model import LeanCausalLM, lean_config, load_for_generation
from harness.io import DataError
from harness.models.hf import build_tiny, load
from tests.test_generation import WORDS, tok  # noqa: F401 - tok is a fixture

SMALL = Tiny(hidden_size=64, num_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128)


@pytest.fixture(scope="module")
def ckpt(tok, tmp_path_factory):  # noqa: F811
    path = tmp_path_factory.mktemp("ckpt") / "model"
    build_tiny(SMALL, tok, seed=2).save(path, {"seed": 2})
    return path


def test_lean_load_generates_the_same_bits_as_the_hf_model(ckpt):
    lean, ref = load_for_generation(ckpt), load(ckpt)
    assert isinstance(lean.model, LeanCausalLM) and not isinstance(ref.model, LeanCausalLM)
    assert lean.config == ref.config == {"seed": 2}
    prompts = [" ".join(WORDS[i:i + 3 + i % 5]) for i in range(6)]
    sp, lp = SamplingParams(temperature=1.0, end_strings=[]), LengthParams(max_length=12, min_length=1)
    parts = [(1, 0, i) for i in range(len(prompts))]
    a = generate(lean, prompts, num_samples=3, sampling_params=sp, length_params=lp, seed_parts=parts)
    b = generate(ref, prompts, num_samples=3, sampling_params=sp, length_params=lp, seed_parts=parts)
    assert a == b
    ids = torch.randint(6, 200, (2, 20))
    with torch.no_grad():
        assert torch.allclose(lean.model(input_ids=ids).logits, ref.model(input_ids=ids).logits, atol=1e-5)


def test_lean_load_never_imports_transformers_modeling(ckpt):
    code = ("import sys; from harness.generation.lean_model import load_for_generation as f; "
            f"p = f({str(ckpt)!r}); assert type(p.model).__name__ == 'LeanCausalLM'; "
            "print(sorted(m for m in sys.modules if m.endswith(('modeling_utils', 'modeling_llama', 'sympy', "
            "'torch._dynamo', 'configuration_llama'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"  # none of the heavy imports (seconds each) of the full loader


def test_checkpoints_it_does_not_cover_take_the_full_loader(ckpt, tmp_path):
    cfg = json.loads((ckpt / "config.json").read_text())
    assert lean_config(cfg) is not None
    assert lean_config({**cfg, "rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}}) is None
    assert lean_config({**cfg, "model_type": "gpt2"}) is None
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in ckpt.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    (bad / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(DataError, match="corrupt or truncated safetensors"):
        load_for_generation(bad)
