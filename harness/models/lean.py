"""A trainable Llama without transformers' modeling code: HF's forward, op for op, on HF-named weights.

    policy = load_for_training(path)     # falls back to models.base.load_policy for anything it does not cover

Training stages (sft, sft_baseline, train) used to load transformers' LlamaForCausalLM: ~2.7 s of import at every
stage, and a forward whose per-module Python overhead (hooks, decorators, output records, mask factories) is most
of a step's forward time on the tiny model. LeanTrainLM holds the same parameters under the same names, in the same
order (so AdamW and gradient clipping see them as HF's), and runs the same torch calls in the same order as
transformers' Llama with SDPA attention (RMSNorm in fp32, RoPE tables, repeat_kv, the SDPA call and its mask; RoPE's
rotate_half as an exact equivalent), so forward, gradients and trained weights are bit-identical to the HF path
(tests/test_lean_train.py).
It saves a checkpoint with the files HF's save_pretrained writes (same bytes), so users load it with transformers.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from harness.generation.lean_model import LeanCausalLM, lean_config, load_lean

TRAIN_MODEL_TYPES = ("llama",)  # Mistral and Qwen2 differ in small ways (masks, biases): the HF path trains those
CONFIG_FILES = ("config.json", "generation_config.json")  # kept verbatim: training changes weights only


def train_config(raw: dict) -> SimpleNamespace | None:
    """config.json as LeanTrainLM needs it, or None where its forward would differ from transformers'."""
    c = lean_config(raw)
    if c is None or c.model_type not in TRAIN_MODEL_TYPES or float(raw.get("attention_dropout", 0.0)) != 0.0:
        return None
    pad = raw.get("pad_token_id")
    c.pad_token_id = None if pad is None else int(pad) % c.vocab_size  # nn.Embedding's padding_idx: no gradient
    return c


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """LlamaRMSNorm: in fp32, the weight applied after casting back (HF's exact arithmetic, not F.rms_norm)."""
    dtype = x.dtype
    x = x.to(torch.float32)
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return w * x.to(dtype)


def _repeat_kv(x: torch.Tensor, n: int) -> torch.Tensor:
    b, h, t, d = x.shape
    return x[:, :, None].expand(b, h, n, t, d).reshape(b, h * n, t, d)


def _sdpa_mask(attention_mask: torch.Tensor | None, T: int) -> torch.Tensor | None:
    """create_causal_mask for SDPA: a 4D mask as given; a 2D padding mask as a [B,1,T,T] bool causal & padding mask,
    or None (SDPA's is_causal) when nothing is padded."""
    if attention_mask is None or attention_mask.dim() == 4:
        return attention_mask
    pad = attention_mask.to(torch.bool)
    if bool(pad.all()):
        return None
    ar = torch.arange(T, device=pad.device)
    causal = ar[None, None, :, None] >= ar[None, None, None, :]
    return (causal & pad[:, None, None, :]).expand(pad.shape[0], -1, T, T)


class LeanDecoder:
    """The trunk (LlamaModel.forward): hidden states after the final norm, as `.last_hidden_state`."""

    def __init__(self, lm: LeanTrainLM):
        self.lm = lm

    def __call__(self, input_ids, attention_mask=None, position_ids=None, **_):
        return SimpleNamespace(last_hidden_state=self.lm.hidden(input_ids, attention_mask, position_ids))


class LeanTrainLM(LeanCausalLM):
    """LeanCausalLM's weights with transformers' Llama forward (autograd through it): forward -> .logits;
    get_decoder/get_output_embeddings as HF's (harness.packing runs the LM head on scored positions only)."""

    def __init__(self, config: SimpleNamespace, files: dict[str, str] | None = None):
        super().__init__(config)
        self.files = files or {}  # config.json etc. of the checkpoint it was loaded from, written back unchanged

    def hidden(self, input_ids, attention_mask=None, position_ids=None) -> torch.Tensor:
        c, m = self.config, self.model
        B, T = input_ids.shape
        x = F.embedding(input_ids, m.embed_tokens.weight, c.pad_token_id)
        if position_ids is None:
            position_ids = torch.arange(T, device=x.device).unsqueeze(0)
        mask = _sdpa_mask(attention_mask, T)
        # LlamaRotaryEmbedding.forward
        freqs = position_ids[..., None].float() * m.rotary_emb.inv_freq.to(device=x.device, dtype=torch.float)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = (emb.cos() * m.rotary_emb.attention_scaling).to(dtype=x.dtype).unsqueeze(1)
        sin = (emb.sin() * m.rotary_emb.attention_scaling).to(dtype=x.dtype).unsqueeze(1)
        # HF's rotate_half(q) * sin = cat(-q2, q1) * sin == roll(q) * cat(-sin1, sin2), exactly (a sign flip and a
        # permutation), gradients too: one roll instead of two slices, a neg and a cat per q and k
        half = c.head_dim // 2
        sin = torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)
        groups, hd = c.num_attention_heads // c.num_key_value_heads, c.head_dim
        # sdpa_attention_forward's GQA choice: enable_gqa without a mask, one query packed, else repeat_kv
        gqa = groups > 1 and mask is None
        pack_one = groups > 1 and mask is not None and T == 1
        is_causal = T > 1 and mask is None
        for layer in m.layers:
            a, mlp = layer.self_attn, layer.mlp
            h = _rms(x, layer.input_layernorm.weight, c.rms_norm_eps)
            q = F.linear(h, a.q_proj.weight, a.q_proj.bias).view(B, T, -1, hd).transpose(1, 2)
            k = F.linear(h, a.k_proj.weight, a.k_proj.bias).view(B, T, -1, hd).transpose(1, 2)
            v = F.linear(h, a.v_proj.weight, a.v_proj.bias).view(B, T, -1, hd).transpose(1, 2)
            q = (q * cos) + (q.roll(half, dims=-1) * sin)
            k = (k * cos) + (k.roll(half, dims=-1) * sin)
            lmask = mask
            if pack_one:
                q = q.reshape(B, -1, groups, hd)
                lmask = mask if mask.shape[1] == 1 else mask.reshape(B, -1, groups, mask.shape[-1])
            elif groups > 1 and not gqa:
                k, v = _repeat_kv(k, groups), _repeat_kv(v, groups)
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=lmask, dropout_p=0.0, scale=hd ** -0.5,
                                               is_causal=is_causal, **({"enable_gqa": True} if gqa else {}))
            o = o.reshape(o.shape[0], -1, T, v.shape[-1]).transpose(1, 2).contiguous()
            o = o.reshape(B, T, -1).contiguous()
            x = x + F.linear(o, a.o_proj.weight)
            h = _rms(x, layer.post_attention_layernorm.weight, c.rms_norm_eps)
            x = x + F.linear(F.silu(F.linear(h, mlp.gate_proj.weight)) * F.linear(h, mlp.up_proj.weight),
                             mlp.down_proj.weight)
        return _rms(x, m.norm.weight, c.rms_norm_eps)

    def forward(self, input_ids, attention_mask=None, position_ids=None, **_):
        """HF's calling convention (attention_mask: 2D padding or 4D additive; use_cache etc. ignored: no cache)."""
        return SimpleNamespace(logits=F.linear(self.hidden(input_ids, attention_mask, position_ids),
                                               self.lm_head.weight))

    def get_decoder(self) -> LeanDecoder:
        return LeanDecoder(self)

    def get_output_embeddings(self):
        return self.lm_head

    def save_pretrained(self, path: str | Path) -> None:
        """model.safetensors as transformers writes it (a tied head saved once, metadata format=pt) and the
        checkpoint's config files unchanged."""
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous() for k, v in self.state_dict().items()
                 if not (k == "lm_head.weight" and self.config.tie_word_embeddings)}
        save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
        for name, text in self.files.items():
            (path / name).write_text(text, encoding="utf-8")


def load_for_training(path: str | Path, dtype: torch.dtype = torch.float32):
    """A Policy to train: LeanTrainLM where the checkpoint fits it, else models.base.load_policy (transformers)."""
    from harness.io import recover
    from harness.models.base import load_policy

    path = Path(path)
    recover(path)  # a crash in the middle of replacing this directory left only its backup
    try:
        raw = json.loads((path / "config.json").read_text(encoding="utf-8"))
        config = train_config(raw)
        files = {n: (path / n).read_text(encoding="utf-8") for n in CONFIG_FILES if (path / n).is_file()}
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        config = None
    if config is None:
        return load_policy(path, "hf", dtype)
    policy = load_lean(path, dtype, lambda: LeanTrainLM(config, files))
    policy.model.requires_grad_(True)
    return policy
