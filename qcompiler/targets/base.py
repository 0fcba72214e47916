"""The target interface and registry. Targets hold no algorithm maths: they say what they support,
whether they want fused linears, and which rewrite rules lower quantized patterns to their kernels."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import fx

from qcompiler.errors import SchemeError
from qcompiler.schemes import QuantScheme

if TYPE_CHECKING:
    from qcompiler.pm.rewrite import RewriteRule


class Target:
    name: str = ""
    description: str = ""
    fuse_shared_input_linears: bool = False

    def unsupported_reason(self, scheme: QuantScheme) -> str | None:
        """None when the target can run `scheme`, else why not."""
        raise NotImplementedError

    def supported_schemes(self) -> list[str]:
        from qcompiler.schemes import PRESETS

        return [n for n, s in PRESETS.items() if self.unsupported_reason(s) is None]

    def validate(self, scheme: QuantScheme) -> None:
        reason = self.unsupported_reason(scheme)
        if reason is not None:
            raise SchemeError(
                f"target '{self.name}' cannot run scheme {scheme.describe()}: {reason}. "
                f"It runs: {', '.join(self.supported_schemes())}"
            )

    def lowering_rules(self) -> Sequence[RewriteRule]:
        raise NotImplementedError

    def check_options(self, options: dict[str, str]) -> None:
        """Refuse unknown target options (before any work)."""
        if options:
            raise SchemeError(f"target '{self.name}' takes no --target-option (got {', '.join(options)})")

    def check_model(self, config: Any) -> None:
        """Refuse, before any work, a model architecture the target's format cannot express."""

    def exporter(self, out_dir: Path, model: torch.nn.Module, options: dict[str, str]) -> BlockExporter | None:
        """A writer of the target's own format, fed each lowered block (None: our artefact only)."""
        return None


class BlockExporter(Protocol):
    """Receives lowered blocks in order while the driver runs; writes into the artefact's temporary folder."""

    def add_block(self, index: int, name: str, gm: fx.GraphModule) -> None: ...

    def finish(self, model: torch.nn.Module, metadata: dict[str, str]) -> None: ...

    def abort(self) -> None: ...


_TARGETS: dict[str, Callable[[], Target]] = {}


def register_target(name: str) -> Callable[[type[Target]], type[Target]]:
    def deco(cls: type[Target]) -> type[Target]:
        cls.name = name
        _TARGETS[name] = cls
        return cls

    return deco


def registered_targets() -> dict[str, Callable[[], Target]]:
    import qcompiler.targets.onnxruntime  # noqa: F401  (built-in targets register on import)
    import qcompiler.targets.reference  # noqa: F401

    return dict(_TARGETS)


def get_target(name: str) -> Target:
    targets = registered_targets()
    if name not in targets:
        raise SchemeError(f"unknown target '{name}'; available: {', '.join(sorted(targets))}")
    return targets[name]()
