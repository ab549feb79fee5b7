"""The `hf` backend: the tiny embedded Llama built from model.tiny, any local Hugging Face causal-LM directory,
and checkpoints as ordinary HF directories (model.safetensors + tokenizer + harness_config.yaml).

Weights are only ever read from safetensors: a pickle (.bin) can run code when loaded, so a directory that only
has pytorch_model.bin is refused rather than unpickled.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
import yaml

from harness.io import DataError, atomic_path
from harness.models.base import CONFIG_FILE, Policy

MAX_POSITIONS = 1024  # the tiny model's context: prompts (~100-300 tokens) + judge prompts + responses


def build_tiny(tiny_cfg: Any, tokenizer: Any, seed: int) -> Policy:
    """A LlamaForCausalLM sized by `tiny_cfg` (harness.config.Tiny), initialised from `seed` only.

    The global torch RNG is forked, so building a model neither depends on nor disturbs other random state.
    vocab_size follows the tokenizer (len(tokenizer)), not tiny_cfg.vocab_size, so every token id has a row.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=tiny_cfg.hidden_size,
        intermediate_size=tiny_cfg.intermediate_size,
        num_hidden_layers=tiny_cfg.num_layers,
        num_attention_heads=tiny_cfg.num_attention_heads,
        num_key_value_heads=tiny_cfg.num_key_value_heads,
        max_position_embeddings=MAX_POSITIONS,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    # sdpa: one fused kernel per attention on CPU, deterministic (no atomics), and faster than eager.
    config._attn_implementation = "sdpa"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.eval()
    cfg = {"tiny": dataclasses.asdict(tiny_cfg) if dataclasses.is_dataclass(tiny_cfg) else dict(tiny_cfg),
           "seed": seed}
    return Policy(model=model, tokenizer=tokenizer, config=cfg, backend="hf")


# ----------------------------------------------------------------------------------------------------- load
def _weight_files(path: Path) -> list[Path]:
    """The safetensors shards of a checkpoint directory, checked for presence; never a pickle."""
    single, index = path / "model.safetensors", path / "model.safetensors.index.json"
    if single.is_file():
        return [single]
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, AttributeError) as e:
            raise DataError(f"{index}: malformed safetensors index ({e})") from None
        missing = [s for s in shards if not (path / s).is_file()]
        if missing:
            raise DataError(f"{path}: safetensors shard(s) listed in {index.name} are missing: {missing}")
        return [path / s for s in shards]
    if (path / "pytorch_model.bin").is_file() or list(path.glob("pytorch_model-*.bin")):
        raise DataError(f"{path}: only pytorch_model.bin (pickle) weights found; refusing to unpickle them. "
                        "Convert once with transformers (model.save_pretrained(dir)) to get model.safetensors.")
    raise DataError(f"{path}: no model.safetensors (or model.safetensors.index.json) in the checkpoint directory")


def _check_safetensors(files: list[Path]) -> dict[str, tuple[int, ...]]:
    """Open every shard and read its header: a truncated or corrupt file fails here, naming the file."""
    from safetensors import safe_open

    shapes = {}
    for f in files:
        size = f.stat().st_size
        try:
            with safe_open(str(f), framework="pt") as sf:
                for key in sf.keys():  # noqa: SIM118 - safe_open has keys(), not iteration
                    shapes[key] = tuple(sf.get_slice(key).get_shape())
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error types; all mean "bad file"
            raise DataError(f"{f}: corrupt or truncated safetensors file ({size} bytes): {e}") from None
    return shapes


def _check_shapes(path: Path, shapes: dict[str, tuple[int, ...]]) -> None:
    """Compare the file's tensor shapes with those config.json implies (model built on the meta device: free)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
        with torch.device("meta"):
            expected = {k: tuple(v.shape) for k, v in AutoModelForCausalLM.from_config(config).state_dict().items()}
    except Exception as e:  # noqa: BLE001 - unknown model_type, bad values: the config is unusable
        raise DataError(f"{path / 'config.json'}: cannot build a causal LM from it: {type(e).__name__}: {e}") from None
    bad = [f"{k}: file {shapes[k]} vs config {expected[k]}" for k in sorted(shapes) if k in expected
           and shapes[k] != expected[k]]
    if bad:
        raise DataError(f"{path}: weight shapes do not match config.json: " + "; ".join(bad[:5])
                        + (f" (+{len(bad) - 5} more)" if len(bad) > 5 else ""))


def load(path: str | Path, dtype: torch.dtype = torch.float32) -> Policy:
    """Load a local HF causal-LM directory (Llama, Qwen, Mistral, GPT-2, ...) or a harness checkpoint."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a bar per load of a tiny model is noise: stages report their own progress
    path = Path(path)
    if not path.is_dir():
        raise DataError(f"{path}: checkpoint directory not found")
    if not (path / "config.json").is_file():
        raise DataError(f"{path}: no config.json; not a Hugging Face model directory")
    _check_shapes(path, _check_safetensors(_weight_files(path)))
    try:
        model, info = AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, use_safetensors=True, local_files_only=True, output_loading_info=True)
    except Exception as e:  # noqa: BLE001 - shape mismatches, bad config values...: all mean "bad checkpoint"
        raise DataError(f"{path}: cannot load the model: {type(e).__name__}: {e}") from None
    problems = {k: sorted(map(str, v)) for k, v in info.items()
                if k in ("missing_keys", "mismatched_keys", "error_msgs") and v}
    if problems:
        # transformers only warns and initialises missing weights randomly: a silent corruption here.
        raise DataError(f"{path}: weights do not match config.json: {problems}")
    return policy_from_dir(path, model)


def policy_from_dir(path: Path, model: torch.nn.Module, tokenizer_class: str | None = None) -> Policy:
    """The Policy of a checkpoint directory whose weights are in `model`: its tokenizer (AutoTokenizer, or the named
    transformers class) and harness config."""
    import transformers

    try:
        cls = getattr(transformers, tokenizer_class or "AutoTokenizer", None) or transformers.AutoTokenizer
        tokenizer = cls.from_pretrained(path, local_files_only=True)
    except Exception as e:  # noqa: BLE001
        raise DataError(f"{path}: cannot load the tokenizer: {type(e).__name__}: {e}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # batching needs a pad id; it is always masked out
    model.eval()
    cfg_file = path / CONFIG_FILE
    config = {}
    if cfg_file.is_file():
        try:
            config = yaml.safe_load(cfg_file.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            raise DataError(f"{cfg_file}: malformed YAML ({e})") from None
    return Policy(model=model, tokenizer=tokenizer, config=config, backend="hf")



# ----------------------------------------------------------------------------------------------------- save
def save(policy: Policy, path: str | Path, resolved_config: dict) -> None:
    """Weights (safetensors) + tokenizer + harness_config.yaml, replacing `path` only once all are written."""
    with atomic_path(path) as tmp:
        tmp.mkdir()
        policy.model.save_pretrained(tmp)
        policy.tokenizer.save_pretrained(tmp)
        (tmp / CONFIG_FILE).write_text(
            yaml.safe_dump(resolved_config, sort_keys=False, allow_unicode=True, width=120), encoding="utf-8")
