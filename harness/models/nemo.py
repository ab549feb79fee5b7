"""`.nemo` checkpoints in and out, at the format level (nemo-toolkit is not a dependency).

    harness export-nemo runs/iter2/model model.nemo          # ours -> NeMo's layout
    harness generate -i 0 pretrained_checkpoint.restore_from_path=/path/model.nemo   # NeMo's -> ours (hf or mcore)

The layout, as measured on archives nemo-toolkit 2.4/2.7 wrote and as megatron-core's dist_checkpointing writes it:

    model.nemo                      a tar (plain or gzipped) of
    ./model_config.yaml             NeMo's model config: num_layers, hidden_size, ffn_hidden_size, num_attention_heads,
                                    num_query_groups, kv_channels, normalization, activation, bias,
                                    position_embedding_type, rotary_base, share_embeddings_and_output_weights, tokenizer
    ./model_weights/                megatron-core distributed checkpoint, torch_dist backend:
        metadata.json               {"sharded_backend": "torch_dist", "sharded_backend_version": 1,
                                     "common_backend": "torch", "common_backend_version": 1}
        .metadata                   torch.distributed.checkpoint metadata: every tensor's global shape (pickled; read
                                    here by an unpickler that admits only torch's checkpoint-metadata classes)
        __0_0.distcp __0_1.distcp   tensor data (rank 0, two writer threads), each tensor loaded with weights_only
        common.pt                   non-sharded state ({} for a GPT)
    ./tokenizer/                    ours: the Hugging Face tokenizer files (model_config.yaml: tokenizer.type)

Tensor names are `model.` + megatron's sharded names (NeMo 2 directories: `module.`). Per-layer tensors are stacked
along a leading layer dimension (`model.decoder.layers.self_attention.linear_qkv.weight` is [L, (nh + 2 ng) d, h]),
norms carry Transformer Engine names (`…linear_qkv.layer_norm_weight`, `…linear_fc1.layer_norm_weight`), and
`…_extra_state/shard_i_L` byte entries hold TE's FP8 metadata (ignored here). Older archives hold one
`model_weights.ckpt` (or `mp_rank_00/model_weights.ckpt`): a torch.save'd state dict with per-layer keys, loaded with
weights_only=True. A member with an absolute path, `..`, a link or a device refuses the whole archive (DataError)
before anything is extracted, and extraction goes to a fresh temporary folder only.
"""

from __future__ import annotations

import io
import pickle
import posixpath
import tarfile
import tempfile
from pathlib import Path

import torch
import yaml

from harness import parallel
from harness.io import DataError, atomic_path
from harness.models import convert
from harness.models.base import CONFIG_FILE

CONFIG, WEIGHTS, TOKENIZER = "model_config.yaml", "model_weights", "tokenizer"
SHARDED_META = {"sharded_backend": "torch_dist", "sharded_backend_version": 1, "common_backend": "torch",
                "common_backend_version": 1}
_TE_NORMS = {"self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
             "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight"}


def is_nemo(path: str | Path) -> bool:
    p = Path(path)
    return p.suffix == ".nemo" or (p.is_dir() and (p / CONFIG).is_file()) or (p.is_file() and tarfile.is_tarfile(p))


# ----------------------------------------------------------------------------------------------------- archive
def safe_extract(archive: Path, dest: Path) -> None:
    """Extract a tar into dest after checking every member; one unsafe member refuses the whole archive."""
    try:
        tf = tarfile.open(archive, "r:*")
    except (tarfile.TarError, OSError) as e:
        raise DataError(f"{archive}: not a readable .nemo (tar) archive: {e}") from None
    with tf:
        members = tf.getmembers()
        for m in members:
            norm = posixpath.normpath(m.name)
            if m.name.startswith(("/", "\\")) or norm == ".." or norm.startswith("../") or ":" in m.name.split("/")[0]:
                raise DataError(f"{archive}: unsafe member path {m.name!r} (absolute or outside the archive); "
                                "nothing extracted")
            if not (m.isfile() or m.isdir()):
                kind = "link" if (m.issym() or m.islnk()) else "special file"
                raise DataError(f"{archive}: member {m.name!r} is a {kind}; only files and folders are accepted, "
                                "nothing extracted")
        kw = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}  # the stdlib's own checks on top
        tf.extractall(dest, members=members, **kw)


def _write_tar(src: Path, out: Path) -> None:
    """src's contents as ./name entries, sorted, with fixed owners and times (same files -> same archive)."""
    with atomic_path(out) as tmp, tarfile.open(tmp, "w") as tf:
        for p in sorted(src.rglob("*")):
            info = tf.gettarinfo(str(p), arcname="./" + p.relative_to(src).as_posix())
            info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
            info.mode = 0o755 if p.is_dir() else 0o644
            if p.is_dir():
                tf.addfile(info)
            else:
                with open(p, "rb") as f:
                    tf.addfile(info, f)


# ----------------------------------------------------------------------------------------------------- torch_dist
class _MetadataUnpickler(pickle.Unpickler):
    """Only the classes torch.distributed.checkpoint writes into .metadata: no code can run while reading it."""

    MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.planner",
               "torch.distributed.checkpoint.filesystem")

    def find_class(self, module: str, name: str):
        obj = None
        if module in self.MODULES:
            obj = getattr(__import__(module, fromlist=[name]), name, None)
            obj = obj if isinstance(obj, type) or name == "_MEM_FORMAT_ENCODING" else None
        elif module == "torch" and (name == "Size" or isinstance(getattr(torch, name, None), torch.dtype)):
            obj = getattr(torch, name)
        elif (module, name) == ("torch.serialization", "_get_layout"):
            obj = torch.serialization._get_layout
        if obj is None:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return obj


def _read_torch_dist(wdir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a torch_dist checkpoint at its global shape (whatever TP/PP sharding wrote it)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    class Reader(dcp.FileSystemReader):
        def read_metadata(self, *args, **kwargs):
            with open(wdir / ".metadata", "rb") as f:
                md = _MetadataUnpickler(f).load()
            md.storage_meta = getattr(md, "storage_meta", None) or dcp.metadata.StorageMeta()
            return md

    try:
        reader = Reader(str(wdir))
        md = reader.read_metadata()
        out = {k: torch.empty(v.size, dtype=v.properties.dtype) for k, v in md.state_dict_metadata.items()
               if isinstance(v, TensorStorageMetadata)}
        dcp.load(out, storage_reader=reader, no_dist=True)
    except (OSError, pickle.UnpicklingError, EOFError, RuntimeError, ValueError, AttributeError) as e:
        raise DataError(f"{wdir}: unreadable torch_dist checkpoint: {type(e).__name__}: {e}") from None
    return out


def _read_legacy(path: Path) -> dict[str, torch.Tensor]:
    try:
        with torch.serialization.safe_globals([io.BytesIO]):  # TE's _extra_state values; never code
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - weights_only refusals and corrupt files alike mean "bad checkpoint"
        raise DataError(f"{path}: unreadable or unsafe weights file ({type(e).__name__}: {e})") from None
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    if not isinstance(state, dict):
        raise DataError(f"{path}: expected a state dict")
    return {k: v for k, v in state.items() if torch.is_tensor(v)}


def to_full(tensors: dict[str, torch.Tensor], num_layers: int, where: str) -> dict[str, torch.Tensor]:
    """NeMo tensor names (stacked or per layer, TE or local norm names, model./module. prefix) -> mcore's full names."""
    prefixes = [p for p in ("model.", "module.") if any(k.startswith(p) for k in tensors)]
    if not prefixes:
        raise DataError(f"{where}: no tensor named model.* or module.*; not a NeMo GPT checkpoint")
    out = {}
    for key, t in tensors.items():
        if not key.startswith(prefixes[0]) or "_extra_state" in key:
            continue
        name = key[len(prefixes[0]):]
        for te, local in _TE_NORMS.items():
            name = name[: -len(te)] + local if name.endswith(te) else name
        if name.startswith("decoder.layers.") and not name.split(".")[2].isdigit():
            if t.shape[0] != num_layers:
                raise DataError(f"{where}: {key} stacks {t.shape[0]} layers, model_config.yaml says {num_layers}")
            rest = name[len("decoder.layers."):]
            out.update({f"decoder.layers.{i}.{rest}": t[i] for i in range(num_layers)})
        else:
            out[name] = t
    extra = sorted(k for k in out if k.endswith(".bias") or "layer_norm_bias" in k)
    if extra:
        raise DataError(f"{where}: biases ({extra[0]}, ...) are not supported: Llama-family models only")
    return out


# ----------------------------------------------------------------------------------------------------- config
def _find_config(tree) -> dict:
    """NeMo 1 keeps the model keys at the top of model_config.yaml; NeMo 2's model.yaml nests them under config."""
    if isinstance(tree, dict):
        if "num_layers" in tree:
            return tree
        for v in tree.values():
            found = _find_config(v)
            if found:
                return found
    return {}


def spec_from_nemo(tree: dict, vocab_size: int, share: bool, where: str) -> convert.GPTSpec:
    c = _find_config(tree)
    missing = [k for k in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads") if c.get(k) is None]
    if missing:
        raise DataError(f"{where}: missing {', '.join(missing)}")
    act = str(c.get("activation", "swiglu" if c.get("gated_linear_unit", True) else "gelu")).lower()
    checks = {"normalization": (str(c.get("normalization", "rmsnorm")).lower(), "rmsnorm"),
              "activation": ("swiglu" if act in ("swiglu", "fast-swiglu") else act, "swiglu"),
              "bias": (bool(c.get("bias", c.get("add_bias_linear", False))), False),
              "position_embedding_type": (c.get("position_embedding_type", "rope"), "rope"),
              "rotary_percentage": (float(c.get("rotary_percentage", c.get("rotary_percent", 1.0))), 1.0),
              "seq_len_interpolation_factor": (c.get("seq_len_interpolation_factor"), None)}
    bad = [f"{k}={v!r} (needs {want!r})" for k, (v, want) in checks.items() if v != want]
    if bad:
        raise DataError(f"{where}: not a Llama-family model this harness converts: {', '.join(bad)}")
    heads = int(c["num_attention_heads"])
    spec = convert.GPTSpec(
        num_layers=int(c["num_layers"]), hidden_size=int(c["hidden_size"]), ffn_hidden_size=int(c["ffn_hidden_size"]),
        num_attention_heads=heads, num_query_groups=int(c.get("num_query_groups") or heads),
        kv_channels=int(c.get("kv_channels") or int(c["hidden_size"]) // heads), vocab_size=vocab_size,
        max_position_embeddings=int(c.get("max_position_embeddings") or c.get("encoder_seq_length")
                                    or c.get("seq_length") or 4096),
        rotary_base=float(c.get("rotary_base", 10000)), layernorm_epsilon=float(c.get("layernorm_epsilon", 1e-5)),
        share_embeddings_and_output_weights=share)
    spec.check(where)
    return spec


def nemo_config(spec: convert.GPTSpec) -> dict:
    """model_config.yaml for a GPTSpec, in NeMo 1's (megatron_gpt) key names."""
    return {"mcore_gpt": True, "num_layers": spec.num_layers, "hidden_size": spec.hidden_size,
            "ffn_hidden_size": spec.ffn_hidden_size, "num_attention_heads": spec.num_attention_heads,
            "num_query_groups": spec.num_query_groups, "kv_channels": spec.kv_channels,
            "encoder_seq_length": spec.max_position_embeddings,
            "max_position_embeddings": spec.max_position_embeddings, "normalization": "rmsnorm",
            "layernorm_epsilon": spec.layernorm_epsilon, "activation": "fast-swiglu", "bias": False,
            "position_embedding_type": "rope", "rotary_percentage": 1.0, "rotary_base": spec.rotary_base,
            "share_embeddings_and_output_weights": spec.share_embeddings_and_output_weights,
            "hidden_dropout": 0.0, "attention_dropout": 0.0, "ffn_dropout": 0.0, "make_vocab_size_divisible_by": 1,
            "tensor_model_parallel_size": 1, "pipeline_model_parallel_size": 1, "precision": 32,
            "tokenizer": {"library": "huggingface", "type": f"nemo:{TOKENIZER}", "use_fast": True}}


def _tokenizer(root: Path, where: str):
    """The archive's Hugging Face tokenizer folder (ours: ./tokenizer/; NeMo 2: context/nemo_tokenizer/)."""
    from transformers import AutoTokenizer

    dirs = sorted({p.parent for n in ("tokenizer_config.json", "tokenizer.json") for p in root.rglob(n)})
    if not dirs:
        spm = sorted(root.rglob("*tokenizer.model"))
        hint = f" (a SentencePiece {spm[0].name} needs the sentencepiece package and a Hugging Face conversion)" \
            if spm else ""
        raise DataError(f"{where}: no Hugging Face tokenizer (tokenizer.json) in the archive{hint}")
    try:
        tok = AutoTokenizer.from_pretrained(dirs[0], local_files_only=True)
    except Exception as e:  # noqa: BLE001
        raise DataError(f"{where}: cannot load the tokenizer in {dirs[0].relative_to(root)}: {e}") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def read_dir(root: Path, where: str):
    """(full mcore weights, GPTSpec, tokenizer, harness config) of an unpacked NeMo checkpoint."""
    cfg_file = root / CONFIG if (root / CONFIG).is_file() else root / "context" / "model.yaml"
    if not cfg_file.is_file():
        raise DataError(f"{where}: no {CONFIG} (not a .nemo checkpoint, or a damaged one)")
    try:
        tree = yaml.safe_load(cfg_file.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise DataError(f"{where}: malformed {cfg_file.name}: {e}") from None
    wdir = next((root / d for d in (WEIGHTS, "weights") if (root / d / ".metadata").is_file()), None)
    legacy = [p for p in (root / "model_weights.ckpt", root / "mp_rank_00" / "model_weights.ckpt") if p.is_file()]
    if wdir is not None:
        tensors = _read_torch_dist(wdir)
    elif legacy:
        tensors = _read_legacy(legacy[0])
    else:
        raise DataError(f"{where}: no weights ({WEIGHTS}/ with a torch_dist checkpoint, or model_weights.ckpt)")
    num_layers = _find_config(tree).get("num_layers")
    if num_layers is None:
        raise DataError(f"{where}: {cfg_file.name} has no num_layers")
    full = to_full(tensors, int(num_layers), where)
    tok = _tokenizer(root, where)
    rows = full.get("embedding.word_embeddings.weight", torch.empty(0, 0)).shape[0]
    if len(tok) > rows:
        raise DataError(f"{where}: the tokenizer has {len(tok)} tokens, the embedding only {rows} rows")
    spec = spec_from_nemo(tree, len(tok), "output_layer.weight" not in full, where)
    config = {}
    if (root / CONFIG_FILE).is_file():
        config = yaml.safe_load((root / CONFIG_FILE).read_text(encoding="utf-8")) or {}
    return full, spec, tok, config


def read(path: str | Path):
    """(full mcore weights, GPTSpec, tokenizer, harness config) of a .nemo archive or an unpacked NeMo folder."""
    path = Path(path)
    if path.is_dir():
        return read_dir(path, str(path))
    if not path.is_file():
        raise DataError(f"{path}: checkpoint not found")
    with tempfile.TemporaryDirectory(prefix="harness-nemo-") as d:
        safe_extract(path, Path(d))
        return read_dir(Path(d), str(path))


# ----------------------------------------------------------------------------------------------------- write
def write(policy, out: str | Path, resolved_config: dict | None = None) -> None:
    """Export a Policy (either backend) as a .nemo archive in the layout above, via megatron's dist_checkpointing.

    A collective call under tensor parallelism (every rank writes its shards); global rank 0 writes the archive.
    """
    from megatron.core import dist_checkpointing

    from harness.models import mcore

    if policy.backend != "mcore":
        policy = mcore.from_hf(policy)
    lm = policy.model
    with tempfile.TemporaryDirectory(prefix="harness-nemo-") as d:
        root = Path(d)
        (root / WEIGHTS).mkdir()
        dist_checkpointing.save(lm.gpt.sharded_state_dict(prefix="model."), str(root / WEIGHTS))
        if not parallel.is_main():
            return
        (root / CONFIG).write_text(yaml.safe_dump(nemo_config(lm.spec), sort_keys=False), encoding="utf-8")
        policy.tokenizer.save_pretrained(root / TOKENIZER)
        if resolved_config is not None:
            (root / CONFIG_FILE).write_text(yaml.safe_dump(resolved_config, sort_keys=False), encoding="utf-8")
        _write_tar(root, Path(out))
