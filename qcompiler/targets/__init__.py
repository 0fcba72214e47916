"""Targets: what a backend can run, how quantized patterns lower to its kernels. Looked up by name."""

from qcompiler.targets.base import Target, get_target, register_target, registered_targets

__all__ = ["Target", "get_target", "register_target", "registered_targets"]
