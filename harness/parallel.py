"""Where the model runs and how processes share the work: device, precision, data-parallel ranks, torchrun.

    torchrun --standalone --nproc_per_node 2 -m harness.cli train -i 1 trainer.devices=2   # 2 data-parallel ranks
    harness train -i 1 trainer.devices=2          # the same: the command relaunches itself under torchrun

Data parallel: every rank holds the whole model (with megatron-core: its tensor-parallel shard); data-parallel rank r
of D takes the r-th contiguous slice of each global batch, and gradients are summed over the ranks before clipping.
The loss of a micro-batch is already divided by the global batch size, so the sum is the single-process gradient up
to float summation order. Every rank computes the same reference log-probs and validation, and only global rank 0
writes files (harness.io.atomic_path) or logs to MLflow. CPU ranks talk over gloo, GPU ranks over NCCL.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from dataclasses import dataclass

import torch

from harness import config


@dataclass(frozen=True)
class Placement:
    """Device of the model, tensor-parallel size, seed of megatron's RNG tracker. (Weights are fp32 everywhere;
    trainer.precision=bf16 is compute under autocast: models.base.Policy.autocast.)"""

    device: torch.device = torch.device("cpu")
    tensor_parallel: int = 1
    seed: int = 0


_CURRENT = Placement()  # CPU, fp32, one process: what library users and tests get without setup()


def current() -> Placement:
    return _CURRENT


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main() -> bool:
    """Global rank 0 (or no torchrun): the process that writes files."""
    return int(os.environ.get("RANK", "0")) == 0


def resolve(cfg: config.Config) -> Placement:
    """The placement cfg asks for on this machine; ConfigError names the key when it cannot be honoured."""
    tr = cfg.trainer  # keys and their combinations are validated in config.py; here what only this machine knows
    cuda = torch.cuda.is_available()
    if tr.accelerator in ("gpu", "cuda") and not cuda:
        raise config.ConfigError(f"trainer.accelerator={tr.accelerator}: no CUDA device here (use cpu or auto)")
    use_cuda = cuda and tr.accelerator != "cpu"
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if use_cuda else torch.device("cpu")
    want = tr.devices * tr.num_nodes
    if "WORLD_SIZE" in os.environ and world_size() != want:
        raise config.ConfigError(f"trainer.devices x trainer.num_nodes = {want}, but torchrun started {world_size()} "
                            "processes: set them to match the launch")
    tp = cfg.model.tensor_model_parallel_size
    return Placement(device=device, tensor_parallel=tp, seed=cfg.seed)


def setup(cfg: config.Config) -> Placement:
    """Resolve the placement, join the torchrun process group and make it current (once per process)."""
    global _CURRENT
    _CURRENT = resolve(cfg)
    if _CURRENT.device.type == "cuda":
        torch.cuda.set_device(_CURRENT.device)
    if world_size() > 1:
        init_process_group()
    return _CURRENT


def init_process_group() -> None:
    """torch.distributed over torchrun's env://, or a one-process group (megatron-core always needs one)."""
    import torch.distributed as dist

    if dist.is_initialized():
        return
    backend = "nccl" if _CURRENT.device.type == "cuda" else "gloo"
    if world_size() > 1:
        dist.init_process_group(backend)
    else:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)


def needs_launch(cfg: config.Config) -> bool:
    return cfg.trainer.devices * cfg.trainer.num_nodes > 1 and "WORLD_SIZE" not in os.environ


def relaunch(cfg: config.Config, argv: list[str]) -> int:
    """Run this very command under torchrun on this node (trainer.devices processes); returns its exit code."""
    if cfg.trainer.num_nodes > 1:
        raise config.ConfigError("trainer.num_nodes > 1: start every node with torchrun (or srun torchrun; see README)")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={cfg.trainer.devices}",
           "-m", "harness.cli", *argv]
    return subprocess.call(cmd)


def to_device(*items):
    """The current device's copies of tensors (nested in tuples); the same objects on CPU, so CPU runs are unchanged."""
    dev = _CURRENT.device
    if dev.type == "cpu":
        return items

    def move(x):
        return tuple(move(y) for y in x) if isinstance(x, tuple) else x.to(dev, non_blocking=True)

    return tuple(move(x) for x in items)


# ----------------------------------------------------------------------------------------------------- data parallel
def _dp():
    """(group, rank, size) of data parallelism: megatron's data-parallel group when it is set up, else the world."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return None, 0, 1
    ps = sys.modules.get("megatron.core.parallel_state")  # set up only by the mcore backend; never imported here
    if ps is not None and ps.model_parallel_is_initialized():
        group = ps.get_data_parallel_group()
        return group, dist.get_rank(group), dist.get_world_size(group)
    return None, dist.get_rank(), dist.get_world_size()


def shard(batch: list) -> list:
    """This rank's contiguous slice of a global batch (the whole batch with one rank)."""
    _, rank, size = _dp()
    per = math.ceil(len(batch) / size)
    return batch[rank * per:(rank + 1) * per]


def all_sum(values: dict[str, float]) -> dict[str, float]:
    """Sum metric sums over data-parallel ranks (a rank with an empty shard has no keys)."""
    group, _, size = _dp()
    if size == 1:
        return values
    import torch.distributed as dist

    parts: list = [None] * size
    dist.all_gather_object(parts, values, group=group)
    out: dict[str, float] = {}
    for p in parts:
        for k, v in p.items():
            out[k] = out.get(k, 0.0) + v
    return out


class Optimizer:
    """torch AdamW with what data and tensor parallelism need around it.

    Gradients are summed over data-parallel ranks in one flat all-reduce; the clipping norm counts every weight once
    (tensor-parallel shards summed over their group, replicated weights once). With one process it is exactly
    torch.optim.AdamW + torch.nn.utils.clip_grad_norm_, so CPU runs are unchanged.
    """

    def __init__(self, model: torch.nn.Module, **adamw):
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.inner = torch.optim.AdamW(self.params, **adamw)

    @property
    def param_groups(self):
        return self.inner.param_groups

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.inner.zero_grad(set_to_none=set_to_none)

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """Sum gradients over data-parallel ranks, clip them as torch.nn.utils.clip_grad_norm_ does, return the norm."""
        group, _, size = _dp()
        if size > 1:  # one flat all-reduce; a weight without a gradient on some rank counts as zero there
            import torch.distributed as dist
            from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
            flat = _flatten_dense_tensors(grads)
            dist.all_reduce(flat, group=group)
            for p, g in zip(self.params, _unflatten_dense_tensors(flat, grads)):
                p.grad = g
        if current().tensor_parallel == 1:
            return torch.nn.utils.clip_grad_norm_(self.params, max_norm)
        norm = _tp_norm(self.params)
        coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
        for p in self.params:
            if p.grad is not None:
                p.grad.mul_(coef)
        return norm

    def step(self) -> None:
        self.inner.step()

    def state_dict(self) -> dict:
        return self.inner.state_dict()  # what torch.optim.AdamW alone saved: resume states stay compatible

    def load_state_dict(self, state: dict) -> None:
        self.inner.load_state_dict(state)


def _tp_norm(params: list) -> torch.Tensor:
    """L2 norm of the gradients over the whole model: tensor-parallel shards summed over the TP group (megatron marks
    them `tensor_model_parallel`), weights replicated on every TP rank counted once."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    grads = [(p, p.grad) for p in params if p.grad is not None]
    sharded = sum((g.float().pow(2).sum() for p, g in grads if getattr(p, "tensor_model_parallel", False)),
                  torch.zeros(()))
    replicated = sum((g.float().pow(2).sum() for p, g in grads if not getattr(p, "tensor_model_parallel", False)),
                     torch.zeros(()))
    sharded = sharded.to(params[0].device)
    dist.all_reduce(sharded, group=ps.get_tensor_model_parallel_group())
    return (sharded + replicated.to(sharded.device)).sqrt()


def optimizer(model: torch.nn.Module, **adamw):
    """The training loop's optimizer: the model's own (megatron-core on GPU) when it offers one, else Optimizer."""
    own = getattr(model, "make_optimizer", None)
    made = own(**adamw) if own is not None else None
    return made if made is not None else Optimizer(model, **adamw)
