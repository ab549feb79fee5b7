"""Seeds, per-item RNG, deterministic kernels and the environment fingerprint (DESIGN.md: determinism contract).

Import this module before any model code: it sets the NVTE_* flags that Transformer Engine reads at import time.
"""

from __future__ import annotations

import hashlib
import os
import platform
import random
import sys

# Transformer Engine / Megatron read these at import; the tutorial asks for them for reproducible runs.
os.environ.setdefault("NVTE_ALLOW_NONDETERMINISTIC_ALGO", "0")
os.environ.setdefault("NVTE_MASKED_SOFTMAX_FUSION", "0")
# cuBLAS needs a fixed workspace for deterministic GEMMs on GPU; harmless on CPU.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def derive_seed(*parts: int | str) -> int:
    """A 63-bit seed from any tuple, e.g. (seed, iteration, prompt_id, sample_id); stable across runs and machines.

    Hashing (not adding) the parts keeps streams independent: (1, 23) and (12, 3) never collide.
    """
    h = hashlib.sha256("\x1f".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


def item_generator(*parts: int | str, device: str = "cpu"):
    """A torch.Generator seeded for one item, so a sample never depends on batch size, order or worker count."""
    import torch

    g = torch.Generator(device=device)
    g.manual_seed(derive_seed(*parts))
    return g


def seed_everything(seed: int, *, deterministic: bool = True) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    if deterministic:
        # The public torch.use_deterministic_algorithms imports torch._inductor.config only to mirror the flag
        # for compiled code (seconds at every stage start; stages never compile): set the eager flag directly.
        setter = getattr(torch._C, "_set_deterministic_algorithms", None)
        if setter is not None and "torch._inductor.config" not in sys.modules:
            setter(True, warn_only=False)
        else:
            torch.use_deterministic_algorithms(True, warn_only=False)
        torch.backends.cudnn.benchmark = False
        if hasattr(torch.backends, "cudnn"):
            torch.backends.cudnn.deterministic = True


_TORCH_READY: list[int] = []


def torch_ready(seed: int) -> None:
    """Threads, seeds and deterministic kernels, once per process, just before the first model: stages that run no
    model (pairs, report) never import torch."""
    if not _TORCH_READY:
        set_threads()
        seed_everything(seed)
        _TORCH_READY.append(seed)


def set_threads(n: int | None = None) -> None:
    """Fix the intra-op thread count: float reductions are only bit-identical at a fixed thread count."""
    import torch

    n = n or int(os.environ.get("HARNESS_NUM_THREADS", "0")) or min(4, os.cpu_count() or 1)
    torch.set_num_threads(n)


def fingerprint() -> dict:
    """Versions and flags that decide whether two runs can be bit-identical."""
    import torch

    out = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "machine": platform.machine(),
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "num_threads": torch.get_num_threads(),
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
    }
    from importlib.metadata import PackageNotFoundError, version

    # Versions from package metadata: importing megatron-core just to read __version__ costs seconds and warnings.
    for dist in ("transformers", "megatron-core", "transformer-engine", "tokenizers", "safetensors"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:  # a missing optional package is a fact, not an error
            out[dist] = None
    for k in ("NVTE_ALLOW_NONDETERMINISTIC_ALGO", "NVTE_MASKED_SOFTMAX_FUSION", "NVTE_FLASH_ATTN", "NVTE_FUSED_ATTN",
              "CUBLAS_WORKSPACE_CONFIG"):
        out[k] = os.environ.get(k)
    return out
