"""Reproducible Self-Rewarding / Meta-Rewarding alignment harness (arXiv 2401.10020, 2407.19594)."""

__version__ = "0.1.0"
