"""Policy backends behind one small interface (base.Policy); `hf` is the default."""

from harness.models.base import Policy, load_policy

__all__ = ["Policy", "load_policy"]
