"""Targets: what a backend can run, how quantized patterns lower to its kernels. Looked up by name: the built-in
targets register themselves (targets/base.register_target) when this package imports them."""

from __future__ import annotations

from collections.abc import Callable

import qcompiler.targets.ascend  # noqa: F401  (built-in targets register on import)
import qcompiler.targets.cuda  # noqa: F401
import qcompiler.targets.onnxruntime  # noqa: F401
import qcompiler.targets.reference  # noqa: F401
from qcompiler.errors import SchemeError
from qcompiler.targets.base import _TARGETS, Target, register_target


def registered_targets() -> dict[str, Callable[[], Target]]:
    return dict(_TARGETS)


def get_target(name: str) -> Target:
    targets = registered_targets()
    if name not in targets:
        raise SchemeError(f"unknown target '{name}'; available: {', '.join(sorted(targets))}")
    return targets[name]()


__all__ = ["Target", "get_target", "register_target", "registered_targets"]
