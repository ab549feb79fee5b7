"""Weights and configs between Hugging Face Llama and megatron-core's GPTModel (local layer spec), both ways.

    spec = spec_from_hf(hf_model.config); mcore_state = hf_to_mcore(hf_model.state_dict(), spec)
    hf_state = mcore_to_hf(mcore_state, spec)                      # the exact inverse: slicing and concatenation only

The mcore state here is the full (tensor-parallel size 1) state dict of a GPTModel built with the local spec:
per-layer keys `decoder.layers.{i}.…`, norms named input_layernorm / pre_mlp_layernorm. What differs from HF:
- fused QKV: megatron keeps, for each of the num_query_groups KV groups in turn, that group's query heads, then its
  key head, then its value head (so a tensor-parallel split by rows keeps whole groups together);
- SwiGLU: one linear_fc1 = [gate_proj; up_proj] (megatron applies silu to the first half, multiplies by the second);
- RMSNorm weights map one to one; rotary (RoPE, not interleaved) has no weights, only rotary_base = rope_theta;
- tied embeddings: no output_layer.weight (GPTModel shares the embedding), untied: output_layer.weight = lm_head.
Any other architecture (biases, sliding window, rope scaling, other activations) is refused with a DataError rather
than converted approximately: a silent conversion error (say every RMSNorm weight written as 1.0) would still load.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from harness.io import DataError


@dataclass(frozen=True)
class GPTSpec:
    """Everything that shapes a Llama-family GPTModel (megatron-core TransformerConfig names)."""

    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    kv_channels: int
    vocab_size: int  # logits width (HF config.vocab_size); the embedding may be padded beyond it for TP
    max_position_embeddings: int
    rotary_base: float = 10000.0
    layernorm_epsilon: float = 1e-6
    share_embeddings_and_output_weights: bool = True

    def check(self, where: str) -> None:
        bad = [f.name for f in dataclasses.fields(self) if f.type in ("int",) and getattr(self, f.name) < 1]
        if bad or self.num_attention_heads % self.num_query_groups:
            raise DataError(f"{where}: inconsistent model shape {dataclasses.asdict(self)}")


# ----------------------------------------------------------------------------------------------------- configs
def spec_from_hf(config, where: str = "config.json") -> GPTSpec:
    """The GPTSpec of a Llama config; anything the local-spec GPTModel would compute differently is refused."""
    if getattr(config, "model_type", None) != "llama":
        raise DataError(f"{where}: model_type {getattr(config, 'model_type', None)!r}: the mcore backend converts "
                        "Llama-family checkpoints only (use model.backend=hf for other architectures)")
    rope = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    problems = {
        "hidden_act": (config.hidden_act, "silu"),
        "attention_bias": (getattr(config, "attention_bias", False), False),
        "mlp_bias": (getattr(config, "mlp_bias", False), False),
        "rope type": (rope.get("rope_type", rope.get("type", "default")), "default"),
    }
    bad = [f"{k}={v!r} (needs {want!r})" for k, (v, want) in problems.items() if v != want]
    if bad:
        raise DataError(f"{where}: not convertible to megatron-core GPTModel: {', '.join(bad)}")
    heads = config.num_attention_heads
    return GPTSpec(
        num_layers=config.num_hidden_layers, hidden_size=config.hidden_size, ffn_hidden_size=config.intermediate_size,
        num_attention_heads=heads, num_query_groups=config.num_key_value_heads or heads,
        kv_channels=getattr(config, "head_dim", None) or config.hidden_size // heads, vocab_size=config.vocab_size,
        max_position_embeddings=config.max_position_embeddings,
        rotary_base=float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))),
        layernorm_epsilon=config.rms_norm_eps, share_embeddings_and_output_weights=bool(config.tie_word_embeddings))


def hf_config(spec: GPTSpec, tokenizer=None):
    """The LlamaConfig of a GPTSpec (special token ids from the tokenizer when given)."""
    from transformers import LlamaConfig

    ids = {} if tokenizer is None else {k: getattr(tokenizer, k, None)
                                        for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    config = LlamaConfig(
        vocab_size=spec.vocab_size, hidden_size=spec.hidden_size, intermediate_size=spec.ffn_hidden_size,
        num_hidden_layers=spec.num_layers, num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_query_groups, head_dim=spec.kv_channels,
        max_position_embeddings=spec.max_position_embeddings, rms_norm_eps=spec.layernorm_epsilon,
        rope_parameters={"rope_type": "default", "rope_theta": spec.rotary_base},
        tie_word_embeddings=spec.share_embeddings_and_output_weights, **ids)
    config._attn_implementation = "sdpa"  # as hf.build_tiny: one fused kernel, deterministic on CPU
    return config


# ----------------------------------------------------------------------------------------------------- weights
def _qkv_fuse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, s: GPTSpec) -> torch.Tensor:
    g, d = s.num_query_groups, s.kv_channels
    per = s.num_attention_heads // g
    cols = q.shape[-1]
    return torch.cat([q.reshape(g, per * d, cols), k.reshape(g, d, cols), v.reshape(g, d, cols)], dim=1).reshape(
        -1, cols)


def _qkv_split(w: torch.Tensor, s: GPTSpec) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g, d = s.num_query_groups, s.kv_channels
    per = s.num_attention_heads // g
    q, k, v = w.reshape(g, (per + 2) * d, w.shape[-1]).split([per * d, d, d], dim=1)
    return q.reshape(-1, w.shape[-1]), k.reshape(-1, w.shape[-1]), v.reshape(-1, w.shape[-1])


def _take(state: dict, key: str, where: str) -> torch.Tensor:
    if key not in state:
        raise DataError(f"{where}: missing weight {key}")
    return state[key]


def hf_to_mcore(state: dict[str, torch.Tensor], spec: GPTSpec, where: str = "checkpoint") -> dict[str, torch.Tensor]:
    """HF LlamaForCausalLM state dict -> full mcore GPTModel state dict (new tensors, same dtype)."""
    out = {"embedding.word_embeddings.weight": _take(state, "model.embed_tokens.weight", where),
           "decoder.final_layernorm.weight": _take(state, "model.norm.weight", where)}
    for i in range(spec.num_layers):
        h, m = f"model.layers.{i}.", f"decoder.layers.{i}."
        t = lambda k, h=h: _take(state, h + k, where)  # noqa: E731
        out[m + "input_layernorm.weight"] = t("input_layernorm.weight")
        out[m + "self_attention.linear_qkv.weight"] = _qkv_fuse(
            t("self_attn.q_proj.weight"), t("self_attn.k_proj.weight"), t("self_attn.v_proj.weight"), spec)
        out[m + "self_attention.linear_proj.weight"] = t("self_attn.o_proj.weight")
        out[m + "pre_mlp_layernorm.weight"] = t("post_attention_layernorm.weight")
        out[m + "mlp.linear_fc1.weight"] = torch.cat([t("mlp.gate_proj.weight"), t("mlp.up_proj.weight")])
        out[m + "mlp.linear_fc2.weight"] = t("mlp.down_proj.weight")
    if not spec.share_embeddings_and_output_weights:
        out["output_layer.weight"] = _take(state, "lm_head.weight", where)
    return {k: v.clone() for k, v in out.items()}


def mcore_to_hf(state: dict[str, torch.Tensor], spec: GPTSpec, where: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Full mcore GPTModel state dict -> HF LlamaForCausalLM state dict (lm_head omitted when tied)."""
    emb = _take(state, "embedding.word_embeddings.weight", where)[: spec.vocab_size]
    out = {"model.embed_tokens.weight": emb, "model.norm.weight": _take(state, "decoder.final_layernorm.weight", where)}
    for i in range(spec.num_layers):
        h, m = f"model.layers.{i}.", f"decoder.layers.{i}."
        t = lambda k, m=m: _take(state, m + k, where)  # noqa: E731
        q, k, v = _qkv_split(t("self_attention.linear_qkv.weight"), spec)
        gate, up = t("mlp.linear_fc1.weight").chunk(2, dim=0)
        out.update({h + "input_layernorm.weight": t("input_layernorm.weight"), h + "self_attn.q_proj.weight": q,
                    h + "self_attn.k_proj.weight": k, h + "self_attn.v_proj.weight": v,
                    h + "self_attn.o_proj.weight": t("self_attention.linear_proj.weight"),
                    h + "post_attention_layernorm.weight": t("pre_mlp_layernorm.weight"),
                    h + "mlp.gate_proj.weight": gate, h + "mlp.up_proj.weight": up,
                    h + "mlp.down_proj.weight": t("mlp.linear_fc2.weight")})
    if not spec.share_embeddings_and_output_weights:
        out["lm_head.weight"] = _take(state, "output_layer.weight", where)[: spec.vocab_size]
    return {k: v.contiguous().clone() for k, v in out.items()}


def build_hf(spec: GPTSpec, state: dict[str, torch.Tensor], tokenizer, dtype: torch.dtype = torch.float32):
    """A LlamaForCausalLM holding `state` (mcore_to_hf's output); every weight checked to be present."""
    from transformers import LlamaForCausalLM

    with torch.random.fork_rng(devices=[]):  # initial values are overwritten; keep the global RNG untouched
        model = LlamaForCausalLM(hf_config(spec, tokenizer))
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and spec.share_embeddings_and_output_weights)]
    if missing or unexpected:
        raise DataError(f"weights do not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model.to(dtype).eval()
