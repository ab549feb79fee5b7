"""Tokenizer, tiny-model building, checkpoint round trip, and every bad-checkpoint case with its message."""

import json

import pytest
import torch

from harness.config import Tiny
from harness.io import DataError
from harness.models import load_policy
from harness.models.hf import build_tiny
from harness.models.tokenizer import CHAT_TOKENS, train_tokenizer

TEXTS = [f"User: what is {a} plus {b}?\nAssistant: {a + b}. The quick brown fox, é ü 日本." for a in range(20)
         for b in range(5)]
SMALL = Tiny(hidden_size=64, num_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128)


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(TEXTS, 320)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, tok):
    path = tmp_path_factory.mktemp("ck") / "policy"
    policy = build_tiny(SMALL, tok, seed=3)
    policy.save(path, {"seed": 3, "model": {"tiny": {"hidden_size": 64}}})
    return policy, path


def test_tokenizer_special_tokens_are_single_ids_and_round_trip(tok):
    text = "<extra_id_0>System\n\n<extra_id_1>User\nwhat is 2 plus 3? 日本<extra_id_1>Assistant\n5</s>"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    for t in CHAT_TOKENS + ("</s>",):
        assert ids.count(tok.convert_tokens_to_ids(t)) == text.count(t)
    assert tok.decode(ids) == text
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<s>", "</s>", "<pad>")
    assert len({tok.bos_token_id, tok.eos_token_id, tok.pad_token_id}) == 3


def test_tokenizer_is_deterministic_and_saved_as_hf_dir(tmp_path, tok):
    from transformers import AutoTokenizer

    train_tokenizer(TEXTS, 320, tmp_path / "a")
    train_tokenizer(TEXTS, 320, tmp_path / "b")
    assert (tmp_path / "a" / "tokenizer.json").read_bytes() == (tmp_path / "b" / "tokenizer.json").read_bytes()
    loaded = AutoTokenizer.from_pretrained(tmp_path / "a", local_files_only=True)
    s = "<extra_id_2>x plus 7"
    assert loaded(s, add_special_tokens=False)["input_ids"] == tok(s, add_special_tokens=False)["input_ids"]
    assert loaded.pad_token_id == tok.pad_token_id


def test_build_tiny_is_deterministic_and_leaves_global_rng(tok):
    torch.manual_seed(0)
    before = torch.rand(1)
    torch.manual_seed(0)
    a = build_tiny(SMALL, tok, seed=7).model.state_dict()
    assert torch.equal(torch.rand(1), before)  # the global RNG was not consumed
    b = build_tiny(SMALL, tok, seed=7).model.state_dict()
    c = build_tiny(SMALL, tok, seed=8).model.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    # another seed draws every weight afresh (not a perturbation of seed 7's): almost no element is equal
    assert (a["model.embed_tokens.weight"] == c["model.embed_tokens.weight"]).float().mean() < 0.01
    cfg = build_tiny(SMALL, tok, seed=7).model.config
    assert (cfg.vocab_size, cfg.hidden_size, cfg.num_key_value_heads, cfg.tie_word_embeddings) == (len(tok), 64, 2, True)


def test_save_load_round_trip_gives_identical_logits(ckpt):
    policy, path = ckpt
    assert {"config.json", "model.safetensors", "tokenizer.json", "harness_config.yaml"} <= {
        p.name for p in path.iterdir()}
    assert not list(path.parent.glob(".*tmp"))  # the atomic write left no temporary behind
    loaded = load_policy(path)
    ids = torch.tensor([[5, 9, 30, 31, 40], [7, 8, 9, 2, 2]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    with torch.no_grad():
        assert torch.equal(policy.forward_logits(ids, mask), loaded.forward_logits(ids, mask))
    assert loaded.config == {"seed": 3, "model": {"tiny": {"hidden_size": 64}}}
    assert loaded.eos_token_id == policy.eos_token_id


def _copy(path, tmp_path):
    import shutil

    dst = tmp_path / "copy"
    shutil.copytree(path, dst)
    return dst


def test_missing_directory_and_files(tmp_path, ckpt):
    with pytest.raises(DataError, match="nowhere.*not found"):
        load_policy(tmp_path / "nowhere")
    d = _copy(ckpt[1], tmp_path)
    (d / "config.json").unlink()
    with pytest.raises(DataError, match=f"{d}.*config.json"):
        load_policy(d)
    d2 = _copy(ckpt[1], tmp_path / "x")
    (d2 / "model.safetensors").unlink()
    with pytest.raises(DataError, match=f"{d2}.*no model.safetensors"):
        load_policy(d2)


def test_truncated_and_corrupt_safetensors(tmp_path, ckpt):
    d = _copy(ckpt[1], tmp_path)
    f = d / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=f"{f}: corrupt or truncated"):
        load_policy(d)
    f.write_bytes(b"\x00" * 64)
    with pytest.raises(DataError, match=f"{f}: corrupt or truncated"):
        load_policy(d)


def test_shape_mismatch_and_missing_weights(tmp_path, ckpt):
    d = _copy(ckpt[1], tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 96}))
    with pytest.raises(DataError, match=r"weight shapes do not match config.json: .*mlp.down_proj.weight: file \(64, 128\)"):
        load_policy(d)
    (d / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 3}))
    with pytest.raises(DataError, match=r"missing_keys.*layers\.2\."):
        load_policy(d)


def test_pickle_only_directory_is_refused(tmp_path, ckpt):
    d = _copy(ckpt[1], tmp_path)
    (d / "model.safetensors").rename(d / "pytorch_model.bin")
    with pytest.raises(DataError, match="only pytorch_model.bin.*refusing to unpickle"):
        load_policy(d)


def test_foreign_tokenizer_without_pad_gets_eos(tmp_path, ckpt):
    d = _copy(ckpt[1], tmp_path)
    tc = json.loads((d / "tokenizer_config.json").read_text())
    tc.pop("pad_token", None)
    (d / "tokenizer_config.json").write_text(json.dumps(tc))
    (d / "harness_config.yaml").unlink()
    loaded = load_policy(d)
    assert loaded.tokenizer.pad_token_id == loaded.eos_token_id
    assert loaded.config == {}
