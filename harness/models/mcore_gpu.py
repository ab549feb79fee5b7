"""Megatron-core's DistributedDataParallel and optimizer for the `mcore` backend on GPUs (both need CUDA).

The training loop (harness.train._run) drives an optimizer through zero_grad / clip_grad_norm_ / step / param_groups /
state_dict; MegatronOptimizer gives Megatron's the same surface. Megatron reduces gradients over the data-parallel
group in its own fp32 buffers and clips over the whole model (tensor-parallel shards included). Weights are fp32 as
on the CPU path (trainer.precision=bf16 is compute under autocast); a model built with bf16 params would get fp32 main
weights in the optimizer. Weight decay applies to every weight, as the CPU path's torch AdamW does. Not exercised on
the CPU-only CI: see README (GPU path).
"""

from __future__ import annotations

import math

import torch


class MegatronOptimizer:
    def __init__(self, ddp, optimizer, config):
        self.ddp, self.optimizer, self.config = ddp, optimizer, config

    @property
    def param_groups(self):
        return self.optimizer.param_groups

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.ddp.zero_grad_buffer()
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """All-reduce the gradients, then Megatron's step (it clips and updates in one call); returns the norm."""
        self.ddp.finish_grad_sync()
        self.config.clip_grad = max_norm if math.isfinite(max_norm) else 0.0
        ok, norm, _ = self.optimizer.step()
        if not ok:
            raise FloatingPointError("megatron optimizer: inf/nan in the gradients; the step was skipped")
        return torch.tensor(float(norm))

    def step(self) -> None:
        """Done inside clip_grad_norm_ (Megatron's step is prepare + clip + update)."""

    def state_dict(self) -> dict:
        return self.optimizer.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state)


def megatron_optimizer(lm, *, lr: float, betas, eps: float, weight_decay: float) -> MegatronOptimizer:
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    gpt = lm.gpt
    ddp = DistributedDataParallel(
        config=gpt.config, module=gpt,
        ddp_config=DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False,
                                                 use_distributed_optimizer=False))
    # Not a registered submodule: the model's state_dict (checkpoints, resume keys) keeps its own names.
    object.__setattr__(lm, "_ddp", ddp)
    bf16 = gpt.config.bf16
    config = OptimizerConfig(optimizer="adam", lr=lr, weight_decay=weight_decay, adam_beta1=betas[0],
                             adam_beta2=betas[1], adam_eps=eps, bf16=bf16,
                             params_dtype=torch.bfloat16 if bf16 else torch.float32, clip_grad=0.0)
    return MegatronOptimizer(ddp, get_megatron_optimizer(config, [ddp]), config)
