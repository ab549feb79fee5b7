"""The small policy interface every stage uses, so a megatron-core backend can slot in beside the `hf` one.

A backend is a module with `load(path, dtype) -> Policy` and `save(policy, path, resolved_config)`; it is named in
BACKENDS and imported only when used (so `hf` users never import megatron and vice versa).
"""

from __future__ import annotations

import contextlib
import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

BACKENDS = {"hf": "harness.models.hf", "mcore": "harness.models.mcore"}
CONFIG_FILE = "harness_config.yaml"  # the resolved config saved next to every checkpoint


@dataclass
class Policy:
    """A causal LM and its tokenizer.

    model: torch.nn.Module with the HF calling convention forward(input_ids, attention_mask=..., position_ids=...,
        cache/past_key_values=..., use_cache=...) -> object with .logits [B, T, V].
    config: the resolved harness config this policy was built or saved with ({} for a foreign checkpoint).
    """

    model: torch.nn.Module
    tokenizer: Any
    config: dict = field(default_factory=dict)
    backend: str = "hf"
    precision: str = "32"  # trainer.precision: "32", or "bf16"/"bf16-mixed" (bf16 compute, see autocast)

    @property
    def eos_token_id(self) -> int:
        return int(self.tokenizer.eos_token_id)

    @property
    def pad_token_id(self) -> int:
        return int(self.tokenizer.pad_token_id)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def autocast(self):
        """The compute precision of every forward (training, reference, validation, generation).

        bf16 and bf16-mixed: matmuls and attention in bf16 under torch.autocast, over fp32 weights, gradients and
        Adam states (NeMo's megatron_amp_O2 keeps fp32 master weights too; pure bf16 weights would lose the small
        updates of a 1e-6 learning rate). 32: plain fp32, bit-identical on CPU.
        """
        if self.precision == "32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def forward_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Logits [B, T, V] for a right-padded batch (positions count from 0 in every row, as in training)."""
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits

    def save(self, path: str | Path, resolved_config: dict) -> None:
        """Write an atomic checkpoint directory: weights (safetensors), tokenizer, harness_config.yaml."""
        _backend(self.backend).save(self, path, resolved_config)


def _backend(name: str):
    if name not in BACKENDS:
        raise ValueError(f"model.backend: one of {', '.join(BACKENDS)}, got {name!r}")
    try:
        return importlib.import_module(BACKENDS[name])
    except ModuleNotFoundError as e:
        raise ValueError(f"model.backend={name!r} is not available here ({e})") from e


def load_policy(path: str | Path, backend: str = "hf", dtype: torch.dtype = torch.float32) -> Policy:
    """Load a checkpoint directory or a .nemo archive onto the current device (harness.parallel: the CPU unless set
    up otherwise); bad or missing files, or NaN/inf weights, raise harness.io.DataError naming the path."""
    from harness import parallel
    from harness.io import recover
    from harness.models import nemo

    recover(path)  # a crash in the middle of replacing this directory left only its backup
    if backend == "hf" and nemo.is_nemo(path):  # NeMo's layout, converted to a transformers Llama
        from harness.models import convert

        full, spec, tokenizer, config = nemo.read(path)
        model = convert.build_hf(spec, convert.mcore_to_hf(full, spec), tokenizer, dtype)
        policy = Policy(model=model, tokenizer=tokenizer, config=config, backend="hf")
    else:
        policy = _backend(backend).load(path, dtype=dtype)
    device = parallel.current().device
    if backend == "hf" and device.type != "cpu":
        policy.model.to(device)
    return check_finite(policy, path)


def check_finite(policy: Policy, path: str | Path) -> Policy:
    """`policy`, or DataError naming `path` and the tensors holding NaN/inf. This rank's weights only (no
    collective): a NaN checkpoint must not become a NaN model and an IndexError later."""
    from harness.io import DataError

    bad = [n for n, p in policy.model.named_parameters() if not torch.isfinite(p).all()]
    if bad:
        raise DataError(f"{path}: non-finite weights (NaN or inf) in {', '.join(bad[:3])}"
                        + (f" and {len(bad) - 3} more tensors" if len(bad) > 3 else ""))
    return policy
