"""A Llama-family checkpoint for generation without transformers' modeling code.

    policy = load_for_generation(path)     # falls back to models.hf.load for anything it does not cover

Importing transformers' Llama costs about twice torch's import on these machines (~2.7 s), at every generate, judge,
meta_judge and evaluate stage, yet those stages never run its forward: LeanLlama (runners.py) reads the weights
and runs its own. So this module builds a weights-only module with HF's parameter names from config.json and the
safetensors files and LeanLlama runs on it unchanged;
the same weights give the same bits as the HF-loaded model (tests/test_lean_model.py). Training stages load a
trainable subclass with transformers' forward op for op (models.lean.LeanTrainLM) through load_lean.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn

from harness.generation.runners import LEAN_MODEL_TYPES, LeanLlama


class _W(nn.Module):
    """A weight (and bias) of the given shape, on the meta device until loaded: no memory, no init."""

    def __init__(self, *shape: int, bias: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(shape, device="meta"))
        self.bias = nn.Parameter(torch.empty(shape[0], device="meta")) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # as nn.Linear (the LM head of a trained LeanTrainLM)
        return torch.nn.functional.linear(x, self.weight, self.bias)


class _Rotary(nn.Module):
    """HF's default RoPE frequencies (LlamaRotaryEmbedding.compute_default_rope_parameters, same arithmetic)."""

    def __init__(self, theta: float, head_dim: int):
        super().__init__()
        self.register_buffer("inv_freq", 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim)),
                             persistent=False)
        self.attention_scaling = 1.0


class _Layer(nn.Module):
    def __init__(self, c: SimpleNamespace, hd: int, qkv_bias: bool):
        super().__init__()
        h, nh, nkv, inter = c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.intermediate_size
        self.self_attn = nn.Module()
        for name, out in (("q_proj", nh * hd), ("k_proj", nkv * hd), ("v_proj", nkv * hd)):
            setattr(self.self_attn, name, _W(out, h, bias=qkv_bias))
        self.self_attn.o_proj = _W(h, nh * hd)
        self.mlp = nn.Module()
        self.mlp.gate_proj, self.mlp.up_proj, self.mlp.down_proj = _W(inter, h), _W(inter, h), _W(h, inter)
        self.input_layernorm, self.post_attention_layernorm = _W(h), _W(h)


class LeanCausalLM(nn.Module):
    """Weights under HF's names (model.layers.N.self_attn.q_proj.weight, ...) and the config; forward gives logits
    through LeanLlama (validation loss), generation uses LeanLlama directly. Built on the meta device (no memory,
    no init: nn.Linear's init on meta imports torch._dynamo, seconds), then loaded with assign=True."""

    def __init__(self, config: SimpleNamespace):
        super().__init__()
        self.config = config
        hd = config.head_dim
        qkv_bias = config.model_type == "qwen2"
        self.model = nn.Module()
        self.model.embed_tokens = _W(config.vocab_size, config.hidden_size)
        self.model.layers = nn.ModuleList(_Layer(config, hd, qkv_bias) for _ in range(config.num_hidden_layers))
        self.model.norm = _W(config.hidden_size)
        self.model.rotary_emb = _Rotary(config.rope_parameters["rope_theta"], hd)
        self.lm_head = _W(config.vocab_size, config.hidden_size)  # tied on load

    def forward(self, input_ids, attention_mask=None, **_):
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        if getattr(self, "_lean", None) is None:  # fused weights, built once: this module is never trained
            self._lean = LeanLlama(self)
        return SimpleNamespace(logits=self._lean.logits(input_ids, mask))


def lean_config(raw: dict) -> SimpleNamespace | None:
    """config.json as LeanLlama needs it, or None where it differs from what LeanLlama computes (other model types,
    RoPE scaling, sliding windows, biases beyond Qwen2's q/k/v, other activations)."""
    if raw.get("model_type") not in LEAN_MODEL_TYPES or raw.get("hidden_act", "silu") != "silu":
        return None
    rope = raw.get("rope_parameters") or {"rope_theta": raw.get("rope_theta", 10000.0),
                                          **(raw.get("rope_scaling") or {})}
    if rope.get("rope_type", rope.get("type", "default")) != "default" or rope.get("partial_rotary_factor", 1.0) != 1.0:
        return None
    window = raw.get("sliding_window") is not None and raw.get("use_sliding_window", True) is not False
    if window or raw.get("mlp_bias") or raw.get("attention_bias"):
        return None
    try:
        c = SimpleNamespace(
            model_type=raw["model_type"], hidden_size=int(raw["hidden_size"]),
            intermediate_size=int(raw["intermediate_size"]), num_hidden_layers=int(raw["num_hidden_layers"]),
            num_attention_heads=int(raw["num_attention_heads"]),
            num_key_value_heads=int(raw.get("num_key_value_heads") or raw["num_attention_heads"]),
            vocab_size=int(raw["vocab_size"]), rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)), hidden_act="silu",
            rope_parameters={"rope_theta": float(rope.get("rope_theta", 10000.0)), "rope_type": "default"},
            sliding_window=None, max_position_embeddings=raw.get("max_position_embeddings"))
    except (KeyError, TypeError, ValueError):
        return None
    c.head_dim = int(raw.get("head_dim") or c.hidden_size // c.num_attention_heads)
    return c


def load_for_generation(path: str | Path, dtype: torch.dtype = torch.float32):
    """A Policy for generation and logits: LeanCausalLM where the checkpoint fits it, else models.hf.load."""
    from harness.io import recover
    from harness.models.base import load_policy

    path = Path(path)
    recover(path)
    try:
        config = lean_config(json.loads((path / "config.json").read_text(encoding="utf-8")))
    except (OSError, json.JSONDecodeError):
        config = None
    if config is None:
        return load_policy(path, "hf", dtype)
    return load_lean(path, dtype, lambda: LeanCausalLM(config))


def load_lean(path: Path, dtype: torch.dtype, make_model) -> object:
    """A Policy whose model is make_model() (a LeanCausalLM, built on meta) with the checkpoint's weights; the full
    loader (models.base.load_policy: transformers, its checks and errors) where the files do not fit it."""
    from safetensors import safe_open

    from harness import parallel
    from harness.models import hf
    from harness.models.base import check_finite, load_policy

    files = [path / "model.safetensors"]
    if not files[0].is_file():  # .nemo, sharded, missing: the full loader, its checks
        return load_policy(path, "hf", dtype)
    model = make_model()
    config = model.config
    try:
        with safe_open(str(files[0]), framework="pt") as f:
            tensors = {k: f.get_tensor(k).to(dtype) for k in f.keys()}  # noqa: SIM118 - safe_open has keys()
        if config.tie_word_embeddings:  # as transformers does: the embedding is the head
            tensors["lm_head.weight"] = tensors.get("model.embed_tokens.weight")
        model.load_state_dict(tensors, strict=True, assign=True)
    except Exception:  # noqa: BLE001 - missing keys, wrong shapes, a corrupt file: the full loader says which
        return load_policy(path, "hf", dtype)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.eval()
    device = parallel.current().device  # the CPU unless harness.parallel set up a GPU
    if device.type != "cpu":
        model.to(device)
    return check_finite(hf.policy_from_dir(path, model, _tokenizer_class(path)), path)


def _tokenizer_class(path: Path) -> str | None:
    """TokenizersBackend for a plain tokenizer.json tokenizer (what harness checkpoints hold): the class AutoTokenizer
    picks for them, without AutoTokenizer's import of the model's config class (seconds); None: AutoTokenizer."""
    try:
        tc = json.loads((path / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    plain = tc.get("tokenizer_class") in ("TokenizersBackend", "PreTrainedTokenizerFast") and "auto_map" not in tc
    return "TokenizersBackend" if plain and (path / "tokenizer.json").is_file() else None
