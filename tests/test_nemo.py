""".nemo checkpoints: NeMo's layout written by megatron's dist_checkpointing, read back into both backends; the older
single-file layout; NeMo 2's `module.` prefix; unsafe or malformed archives refused before anything is extracted."""

from __future__ import annotations

import io
import os
import pickle
import tarfile
from pathlib import Path

import pytest
import torch
import yaml

from harness import config
from harness.data import sft
from harness.io import DataError
from harness.models import hf, mcore, nemo
from harness.models.base import load_policy
from harness.models.tokenizer import train_tokenizer

TEXTS = [f"item {i}: name {i % 7} fruits and {i % 5} tools." for i in range(50)]


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    """An hf policy (norms randomised) and its .nemo export."""
    tok = train_tokenizer(TEXTS, 290)
    ph = hf.build_tiny(config.Tiny(hidden_size=64, num_layers=2, num_attention_heads=4, num_key_value_heads=2,
                              intermediate_size=96, vocab_size=290), tok, seed=5)
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        for name, p in ph.model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    path = tmp_path_factory.mktemp("nemo") / "model.nemo"
    nemo.write(ph, path, {"seed": 5})
    return ph, path


def logits(policy, n=2, T=11):
    ids = torch.arange(n * T).reshape(n, T) % len(policy.tokenizer)
    with torch.no_grad():
        return policy.model(input_ids=ids).logits


def members(path: Path) -> dict[str, tarfile.TarInfo]:
    with tarfile.open(path) as tf:
        return {m.name: m for m in tf.getmembers()}


def test_export_has_nemos_layout(src):
    _, path = src
    names = set(members(path))
    assert {"./model_config.yaml", "./model_weights/.metadata", "./model_weights/__0_0.distcp",
            "./model_weights/__0_1.distcp", "./model_weights/common.pt", "./model_weights/metadata.json"} <= names
    with tarfile.open(path) as tf:
        meta = yaml.safe_load(tf.extractfile("./model_weights/metadata.json"))
        cfg = yaml.safe_load(tf.extractfile("./model_config.yaml"))
        tf.extractall(path.parent / "x", filter="data")
    assert meta == nemo.SHARDED_META
    assert cfg["num_layers"] == 2 and cfg["num_query_groups"] == 2 and cfg["activation"] == "fast-swiglu"
    shapes = {k: tuple(v.shape) for k, v in nemo._read_torch_dist(path.parent / "x/model_weights").items()}
    assert shapes["model.decoder.layers.self_attention.linear_qkv.weight"] == (2, (4 + 2 * 2) * 16, 64)  # stacked
    assert shapes["model.decoder.layers.self_attention.linear_qkv.layer_norm_weight"] == (2, 64)  # TE names
    assert shapes["model.decoder.layers.mlp.linear_fc1.layer_norm_weight"] == (2, 64)


@pytest.mark.parametrize("backend", ["hf", "mcore"])
def test_round_trip_same_logits(src, backend):
    ph, path = src
    back = load_policy(path, backend=backend)
    assert back.backend == backend and back.config == {"seed": 5}
    assert (logits(back) - logits(ph)).abs().max() < 1e-5
    assert back.tokenizer.get_vocab() == ph.tokenizer.get_vocab()


def _tar(path: Path, files: dict[str, bytes], extra=None) -> Path:
    with tarfile.open(path, "w") as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        for info in extra or []:
            tf.addfile(info)
    return path


def _files_of(path: Path, keep=lambda n: True) -> dict[str, bytes]:
    with tarfile.open(path) as tf:
        return {m.name: tf.extractfile(m).read() for m in tf.getmembers() if m.isfile() and keep(m.name)}


def test_older_single_file_layout(src, tmp_path):
    """model_weights.ckpt: per-layer keys, TE norm names, a BytesIO _extra_state, loaded with weights_only=True."""
    ph, path = src
    full = mcore.from_hf(ph).model.full_state_dict()
    state = {}
    for k, v in full.items():
        k = k.replace("input_layernorm.weight", "self_attention.linear_qkv.layer_norm_weight")
        state["model." + k.replace("pre_mlp_layernorm.weight", "mlp.linear_fc1.layer_norm_weight")] = v
    state["model.decoder.layers.0.self_attention.linear_qkv._extra_state"] = io.BytesIO(b"fp8 meta")
    buf = io.BytesIO()
    torch.save(state, buf)
    files = _files_of(path, lambda n: not n.startswith("./model_weights"))
    legacy = _tar(tmp_path / "old.nemo", {**files, "./model_weights.ckpt": buf.getvalue()})
    assert (logits(load_policy(legacy, backend="mcore")) - logits(ph)).abs().max() < 1e-5


def test_nemo2_directory_with_module_prefix(src, tmp_path):
    """An unpacked NeMo 2 checkpoint: context/model.yaml (config nested), weights/ with `module.` tensor names."""
    from megatron.core import dist_checkpointing

    ph, path = src
    pm = mcore.from_hf(ph)
    root = tmp_path / "nemo2"
    (root / "weights").mkdir(parents=True)
    dist_checkpointing.save(pm.model.gpt.sharded_state_dict(prefix="module."), str(root / "weights"))
    cfg = {k: v for k, v in nemo.nemo_config(pm.model.spec).items() if k != "activation"}
    (root / "context").mkdir()
    (root / "context/model.yaml").write_text(yaml.safe_dump({"_target_": "LlamaModel", "config": {
        **cfg, "gated_linear_unit": True}}))
    ph.tokenizer.save_pretrained(root / "context/nemo_tokenizer")
    assert nemo.is_nemo(root / "context") is False
    back = nemo.read_dir(root, str(root))
    assert back[1] == pm.model.spec


@pytest.mark.parametrize("case,match", [
    ("traversal", "unsafe member path '../escaped.txt'"),
    ("absolute", "unsafe member path '/tmp/"),
    ("symlink", "is a link"),
    ("hardlink", "is a link"),
    ("no_config", "no model_config.yaml"),
    ("not_tar", "not a readable .nemo"),
])
def test_unsafe_or_malformed_archives_are_refused(src, tmp_path, case, match):
    _, path = src
    files = _files_of(path)
    outside = tmp_path / "escaped.txt"
    bad = tmp_path / "bad.nemo"
    if case == "traversal":
        _tar(bad, {**files, "../escaped.txt": b"x"})
    elif case == "absolute":
        _tar(bad, {**files, str(outside): b"x"})
    elif case in ("symlink", "hardlink"):
        link = tarfile.TarInfo("./model_weights/common.pt")
        link.type, link.linkname = (tarfile.SYMTYPE, str(outside)) if case == "symlink" else (tarfile.LNKTYPE, "../x")
        _tar(bad, {k: v for k, v in files.items() if k != "./model_weights/common.pt"}, [link])
    elif case == "no_config":
        _tar(bad, {k: v for k, v in files.items() if k != "./model_config.yaml"})
    else:
        bad.write_bytes(b"this is not a tar archive")
    with pytest.raises(DataError, match=match) as e:
        load_policy(bad, backend="mcore")
    assert str(bad) in str(e.value)
    assert not outside.exists() and not (tmp_path.parent / "escaped.txt").exists()


def test_metadata_pickle_cannot_run_code(src, tmp_path):
    """.metadata is a pickle: a global outside torch's checkpoint-metadata classes is refused, never called."""
    _, path = src
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    files = _files_of(path)
    files["./model_weights/.metadata"] = pickle.dumps(Evil())
    bad = _tar(tmp_path / "evil.nemo", files)
    with pytest.raises(DataError, match="refusing to load posix.system"):
        load_policy(bad, backend="hf")
    assert not marker.exists()


def test_restore_from_path_nemo_runs_the_generate_stage(src, tmp_path):
    """pretrained_checkpoint.restore_from_path=/path/model.nemo through a real stage, on the mcore backend."""
    from harness.stages import Layout, run_generate

    _, path = src
    prompts = tmp_path / "prompts.jsonl"
    sft.write_sft(prompts, [sft.make_record("item 3: name", id="a"), sft.make_record("item 9:", id="b")])
    cfg = config.load(None, [f"pretrained_checkpoint.restore_from_path={path}", "model.backend=mcore",
                        f"model.data.train_ds.file_path={prompts}", "model.spin.num_responses_to_gen=2",
                        "model.spin.length_params.max_length=5"], warn=None)
    out = run_generate(cfg, Layout(tmp_path / "runs"), 0)
    assert out["generate/responses"] == 4
    assert (tmp_path / "runs/iter0/responses.jsonl").is_file()


def test_export_nemo_command(src, tmp_path):
    """`harness export-nemo SRC OUT` on an hf checkpoint directory, read back with the mcore backend."""
    from harness.cli import main

    ph, _ = src
    ph.save(tmp_path / "ckpt", {"seed": 5})
    assert main(["export-nemo", str(tmp_path / "ckpt"), str(tmp_path / "out.nemo"), "-c", "none",
                 "model.backend=mcore"]) == 0
    assert (logits(load_policy(tmp_path / "out.nemo", backend="mcore")) - logits(ph)).abs().max() < 1e-5
