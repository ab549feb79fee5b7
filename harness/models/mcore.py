"""The `mcore` backend: megatron-core's GPTModel behind the Policy interface (DESIGN.md: models/).

    harness sft model.backend=mcore            # every stage; model.tensor_model_parallel_size=2 under torchrun

Reads a Hugging Face Llama directory (converted by harness.models.convert), a `.nemo` archive or an unpacked NeMo
checkpoint (harness.models.nemo). Writes Hugging Face directories: both backends read each other's checkpoints and
a checkpoint's bytes are a pure function of its weights (a torch_dist checkpoint's .metadata holds a random save id);
`harness export-nemo` writes the `.nemo` layout. The local layer spec runs anywhere; on a GPU with Transformer Engine
installed the TE spec is used. The wrapper `MCoreLM` takes the calling convention train.py and the sampler use.
"""

from __future__ import annotations

import contextlib
import importlib.util
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from harness import parallel
from harness.io import DataError, atomic_path
from harness.models import convert
from harness.models.base import CONFIG_FILE, Policy


def cpu_workarounds() -> None:
    """The one place where megatron-core 0.16 is adapted to a CPU run; applied only when the model is on the CPU.

    - torch.cuda.current_device(): megatron allocates its shared attention buffer, the rotary frequencies and the
      KV cache (StaticInferenceContext) on "the current CUDA device" -> the CPU;
    - torch.cuda.synchronize(): dist_checkpointing.save waits for the GPU before writing -> nothing to wait for.
    The third, megatron's CUDA RNG tracker, is replaced in init_parallel by its inference tracker (no CUDA RNG state;
    dropout is 0 here, so it never draws).
    """
    torch.cuda.current_device = lambda: torch.device("cpu")
    torch.cuda.synchronize = lambda *args, **kwargs: None


@contextlib.contextmanager
def quiet():
    """megatron-core warns, on import and per config, that Apex/TE are absent and that its default CUDA-graph scope is
    deprecated: expected on a CPU machine, and noise in every stage's log."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine).*not installed", category=UserWarning)
        warnings.filterwarnings("ignore", message="full scope is deprecated", category=UserWarning)
        yield


def init_parallel(place: parallel.Placement) -> None:
    """torch.distributed, megatron's parallel state (tensor-parallel size) and RNG tracker; once per process."""
    with quiet():
        from megatron.core import parallel_state as ps
        from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    on_cpu = place.device.type == "cpu"
    if on_cpu:
        cpu_workarounds()
    parallel.init_process_group()
    if ps.model_parallel_is_initialized():
        if ps.get_tensor_model_parallel_world_size() == place.tensor_parallel:
            return
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(tensor_model_parallel_size=place.tensor_parallel)
    with torch.random.fork_rng(devices=[]):  # megatron seeds torch's generator: keep the harness's streams untouched
        model_parallel_cuda_manual_seed(place.seed, inference_rng_tracker=on_cpu, force_reset_rng=True)


def use_te(place: parallel.Placement) -> bool:
    return place.device.type == "cuda" and importlib.util.find_spec("transformer_engine") is not None


def build_gpt(spec: convert.GPTSpec, place: parallel.Placement, rows: int, dtype: torch.dtype = torch.float32):
    """An empty (uninitialised) GPTModel for `spec` on place.device; `rows` = embedding rows before TP padding."""
    with quiet():
        return _build_gpt(spec, place, rows, dtype)


def _build_gpt(spec: convert.GPTSpec, place: parallel.Placement, rows: int, dtype: torch.dtype):
    import torch.nn.functional as F
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_layer_local_spec,
        get_gpt_layer_with_transformer_engine_spec,
    )
    from megatron.core.models.gpt.gpt_model import GPTModel
    from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.transformer_config import TransformerConfig

    init_parallel(place)
    tp, te = place.tensor_parallel, use_te(place)
    if spec.num_query_groups % tp or spec.num_attention_heads % tp or spec.ffn_hidden_size % tp:
        raise DataError(f"model.tensor_model_parallel_size={tp} must divide the heads ({spec.num_attention_heads}), "
                        f"KV groups ({spec.num_query_groups}) and MLP size ({spec.ffn_hidden_size})")
    config = TransformerConfig(
        num_layers=spec.num_layers, hidden_size=spec.hidden_size, ffn_hidden_size=spec.ffn_hidden_size,
        num_attention_heads=spec.num_attention_heads, num_query_groups=spec.num_query_groups,
        kv_channels=spec.kv_channels, normalization="RMSNorm", layernorm_epsilon=spec.layernorm_epsilon,
        gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False, hidden_dropout=0.0,
        attention_dropout=0.0, tensor_model_parallel_size=tp,
        params_dtype=dtype, bf16=dtype == torch.bfloat16, deterministic_mode=True,
        use_cpu_initialization=place.device.type == "cpu", perform_initialization=False,  # weights are loaded next
        bias_activation_fusion=False, bias_dropout_fusion=False, apply_rope_fusion=False, masked_softmax_fusion=False,
        persist_layer_norm=False, gradient_accumulation_fusion=False)
    if te:
        layer = get_gpt_layer_with_transformer_engine_spec()
        # Packed DPO rows and left-padded prompts need the mask we pass, not a plain causal one.
        layer.submodules.self_attention.params["attn_mask_type"] = AttnMaskType.arbitrary
    else:
        layer = get_gpt_layer_local_spec(normalization="RMSNorm")
    padded = -(-rows // tp) * tp  # VocabParallelEmbedding needs rows divisible by the TP size
    gpt = GPTModel(config, layer, vocab_size=padded, max_sequence_length=spec.max_position_embeddings,
                   position_embedding_type="rope", rotary_base=spec.rotary_base,
                   share_embeddings_and_output_weights=spec.share_embeddings_and_output_weights).to(place.device)
    # megatron marks TP-sharded weights only while initialising them; the grad-norm (ours and its optimizer's)
    # counts a weight without the mark once per TP group, so mark them here.
    for name, p in gpt.named_parameters():
        rule = _tp_rule(name)
        if not hasattr(p, "tensor_model_parallel"):
            set_tensor_model_parallel_attributes(p, rule is not None, 0 if rule in (0, "glu") else 1, 1)
    return gpt, te


# ----------------------------------------------------------------------------------------------------- the wrapper
@dataclass
class LMOutput:
    logits: torch.Tensor


_TE_NORMS = {"input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
             "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight"}


def _tp_rule(key: str):
    """How a full weight is split over tensor-parallel ranks: a dim, "glu" (gate and up split apart) or None."""
    if key.endswith(("word_embeddings.weight", "output_layer.weight", "linear_qkv.weight")):
        return 0  # vocab rows / whole query groups (megatron's QKV order keeps a group's q, k, v together)
    if key.endswith(("linear_proj.weight", "linear_fc2.weight")):
        return 1  # row-parallel: input columns
    return "glu" if key.endswith("linear_fc1.weight") else None


class MCoreLM(torch.nn.Module):
    """GPTModel with the Hugging Face calling convention: model(input_ids, attention_mask, position_ids).logits.

    attention_mask: None (causal), [B, T] (1 = token, 0 = padding) or [B, 1, T, T] (additive float, 0 = attend, or
    bool, True = attend), as transformers takes it; position_ids drive the rotary embedding per token, so packed rows
    with restarted positions (batches.pack_pairs) and left-padded prompts work. Logits are [B, T, vocab_size].

    state_dict() / load_state_dict() speak the full weights under tensor-parallel-size-independent names (gathered
    over the TP group: a collective call), so resume states, resume keys and checkpoints are the same on every rank
    and for every TP size.
    """

    def __init__(self, gpt, spec: convert.GPTSpec, te: bool = False):
        super().__init__()
        self.gpt, self.spec, self.te = gpt, spec, te

    def state_dict(self, *args, **kwargs) -> dict[str, torch.Tensor]:
        return self.full_state_dict()

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        from torch.nn.modules.module import _IncompatibleKeys

        self.load_full_state_dict(state_dict)  # any missing or unknown weight raises
        return _IncompatibleKeys([], [])

    def rope(self, positions: torch.Tensor) -> torch.Tensor:
        """Rotary embedding [T, B, 1, D] for per-token positions [B, T], from megatron's own frequencies."""
        table = self.gpt.rotary_pos_emb.get_emb(int(positions.max()) + 1)[:, 0, 0]  # [n, D]
        return table[positions].transpose(0, 1).unsqueeze(2)

    def logits(self, input_ids, rope, blocked, context=None, last_only: bool = False) -> torch.Tensor:
        """[B, T, V] (or [B, 1, V]); blocked: bool [B, 1, Tq, Tk], True = not attended (megatron's convention)."""
        g = self.gpt
        h = g.embedding(input_ids=input_ids, position_ids=None)  # [T, B, H]; RoPE lives in attention
        h = g.decoder(hidden_states=h, attention_mask=blocked, rotary_pos_emb=rope, inference_context=context)
        if last_only:
            h = h[-1:]
        weight = g.shared_embedding_or_output_weight() if g.share_embeddings_and_output_weights else None
        out, _ = g.output_layer(h, weight=weight, runtime_gather_output=True)
        return out.transpose(0, 1)[..., : self.spec.vocab_size]

    def forward(self, input_ids, attention_mask=None, position_ids=None, **_) -> LMOutput:
        B, T = input_ids.shape
        dev = input_ids.device
        if position_ids is None:
            position_ids = torch.arange(T, device=dev).expand(B, T)
        causal = torch.ones(T, T, dtype=torch.bool, device=dev).tril()
        if attention_mask is None:
            allowed = causal.expand(B, 1, T, T)
        elif attention_mask.dim() == 2:
            allowed = causal & attention_mask.bool()[:, None, None, :]
        elif attention_mask.dtype == torch.bool:
            allowed = attention_mask
        else:
            allowed = attention_mask >= 0  # additive: 0 where attended, a large negative number elsewhere
        return LMOutput(self.logits(input_ids, self.rope(position_ids), ~allowed))

    def generation_runner(self):
        from harness.generation.mcore import MCoreRunner

        return MCoreRunner(self)

    # ------------------------------------------------------------------------------------- full <-> TP-local weights
    def load_full_state_dict(self, full: dict[str, torch.Tensor]) -> None:
        """Load a full (TP-size 1, local-spec names) state dict: this rank's slices, embeddings padded."""
        from megatron.core import parallel_state as ps

        tp, rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
        own = self.gpt.state_dict()
        local = {}
        for key, w in full.items():
            name = self._te_name(key)
            if name not in own:
                raise DataError(f"weight {key} has no place in the model")
            rule = _tp_rule(key)
            if rule == 0 and key.endswith(("word_embeddings.weight", "output_layer.weight")):
                w = torch.cat([w, w.new_zeros(own[name].shape[0] * tp - w.shape[0], w.shape[1])])
            if rule == "glu":
                gate, up = w.chunk(2)
                w = torch.cat([gate.chunk(tp)[rank], up.chunk(tp)[rank]])
            elif rule is not None:
                w = w.chunk(tp, dim=rule)[rank]
            if w.shape != own[name].shape:
                raise DataError(f"weight {key}: shape {tuple(w.shape)} does not fit the model's {tuple(own[name].shape)}")
            local[name] = w
        missing = [k for k in own if k not in local and not k.endswith("_extra_state")]
        if missing:
            raise DataError(f"weights missing for {missing[:5]}")
        self.gpt.load_state_dict(local, strict=False)

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The full weights (gathered over tensor-parallel ranks; a collective call), local-spec names, on the CPU."""
        import torch.distributed as dist
        from megatron.core import parallel_state as ps

        tp = ps.get_tensor_model_parallel_world_size()
        group = ps.get_tensor_model_parallel_group()
        back = {v: k for k, v in _TE_NORMS.items()}
        out = {}
        for name, w in self.gpt.state_dict().items():
            if name.endswith("_extra_state"):
                continue
            key = next((name.replace(te, loc) for te, loc in back.items() if name.endswith(te)), name)
            rule = _tp_rule(key)
            if tp > 1 and rule is not None:
                parts = [torch.empty_like(w) for _ in range(tp)]
                dist.all_gather(parts, w.contiguous(), group=group)
                if rule == "glu":
                    halves = [p.chunk(2) for p in parts]
                    w = torch.cat([h[0] for h in halves] + [h[1] for h in halves])
                else:
                    w = torch.cat(parts, dim=rule)
            out[key] = w.detach().cpu()
        return out

    def _te_name(self, key: str) -> str:
        if self.te:
            for loc, te in _TE_NORMS.items():
                if key.endswith(loc):
                    return key[: -len(loc)] + te
        return key

    def make_optimizer(self, lr: float, betas, eps: float, weight_decay: float):
        """Megatron's DDP and optimizer on a GPU (fp32 main weights under bf16); None on the CPU (they need CUDA)."""
        if next(self.parameters()).device.type != "cuda":
            return None
        from harness.models.mcore_gpu import megatron_optimizer

        return megatron_optimizer(self, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)


# ----------------------------------------------------------------------------------------------------- load / save
def from_full(full: dict[str, torch.Tensor], spec: convert.GPTSpec, tokenizer, config: dict,
              dtype: torch.dtype = torch.float32) -> Policy:
    """A Policy from full mcore weights (rows of the embedding may exceed spec.vocab_size: padding), on the current
    device (harness.parallel) with its tensor-parallel size."""
    gpt, te = build_gpt(spec, parallel.current(), full["embedding.word_embeddings.weight"].shape[0], dtype)
    lm = MCoreLM(gpt, spec, te)
    lm.load_full_state_dict({k: v.to(dtype) for k, v in full.items()})
    lm.eval()
    return Policy(model=lm, tokenizer=tokenizer, config=config, backend="mcore")


def from_hf(policy: Policy) -> Policy:
    """The mcore twin of an hf Policy (same weights, converted; same dtype and precision)."""
    spec = convert.spec_from_hf(policy.model.config)
    full = convert.hf_to_mcore(policy.model.state_dict(), spec)
    out = from_full(full, spec, policy.tokenizer, policy.config, next(policy.model.parameters()).dtype)
    out.precision = policy.precision
    return out


def load(path: str | Path, dtype: torch.dtype = torch.float32) -> Policy:
    """A Hugging Face Llama directory, a .nemo archive or an unpacked NeMo checkpoint, as a GPTModel."""
    from harness.models import hf, nemo

    if nemo.is_nemo(path):
        full, spec, tokenizer, config = nemo.read(path)
        return from_full(full, spec, tokenizer, config, dtype)
    return from_hf(hf.load(path, dtype=dtype))  # hf.load checks files, shapes and the tokenizer


def to_hf_state(policy: Policy) -> tuple[dict[str, torch.Tensor], convert.GPTSpec]:
    return convert.mcore_to_hf(policy.model.full_state_dict(), policy.model.spec), policy.model.spec


def save(policy: Policy, path: str | Path, resolved_config: dict) -> None:
    """A Hugging Face directory (config.json, model.safetensors, tokenizer, harness_config.yaml), atomically.

    With tensor parallelism every rank takes part in gathering the weights; only global rank 0 writes.
    """
    from safetensors.torch import save_file

    state, spec = to_hf_state(policy)
    if not parallel.is_main():
        return
    with atomic_path(path) as tmp:
        tmp.mkdir()
        convert.hf_config(spec, policy.tokenizer).save_pretrained(tmp)
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        policy.tokenizer.save_pretrained(tmp)
        (tmp / CONFIG_FILE).write_text(
            yaml.safe_dump(resolved_config, sort_keys=False, allow_unicode=True, width=120), encoding="utf-8")


def build_tiny(tiny_cfg, tokenizer, seed: int) -> Policy:
    """The embedded tiny model as a GPTModel: hf.build_tiny's weights (same seed, same numbers), converted."""
    from harness.models import hf

    return from_hf(hf.build_tiny(tiny_cfg, tokenizer, seed))
