"""The pass API.

A pass is a frozen dataclass: its fields are its options (and its CLI syntax `name{field=value,...}`).
It may ask for calibration statistics (`stat_requests`) and then transforms a block graph in `run`,
returning a PassResult. The manager lints the graph after every pass and can dump it before/after.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import fx

from qcompiler.calib.stats import StatRequest, Stats
from qcompiler.errors import PipelineError
from qcompiler.schemes import QuantScheme

if TYPE_CHECKING:
    from qcompiler.targets.base import Target


@dataclass
class PassContext:
    """What a pass may read besides the graph. Nothing here is global; one context per block."""

    block: str  # checkpoint prefix of the block, e.g. "model.layers.3"
    scheme: QuantScheme
    target: Target
    calib: Sequence[tuple[torch.Tensor, ...]] = ()  # flat block inputs, one tuple per batch
    report: dict[str, Any] = field(default_factory=dict)  # per-pass facts for the user-facing report


@dataclass(frozen=True)
class PassResult:
    graph_module: fx.GraphModule
    modified: bool
    details: dict[str, Any] = field(default_factory=dict)


_REGISTRY: dict[str, type[Pass]] = {}


@dataclass(frozen=True)
class Pass:
    """Base class. Subclasses set `name`, declare options as fields and implement `run`."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.name:
            if cls.name in _REGISTRY and _REGISTRY[cls.name].__qualname__ != cls.__qualname__:
                raise RuntimeError(f"two passes named '{cls.name}'")
            _REGISTRY[cls.name] = cls

    def stat_requests(self, gm: fx.GraphModule, ctx: PassContext) -> list[StatRequest]:
        """Statistics this pass needs, collected on the current graph before `run` (default: none)."""
        return []

    def run(self, gm: fx.GraphModule, ctx: PassContext, stats: Stats) -> PassResult:
        raise NotImplementedError

    def spec(self) -> str:
        """This pass in pipeline-string syntax (options that differ from the defaults)."""
        opts = []
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if v != f.default:
                opts.append(f"{f.name}={v}")
        return f"{self.name}{{{','.join(opts)}}}" if opts else self.name


def registered_passes() -> dict[str, type[Pass]]:
    import qcompiler.passes  # noqa: F401  (registers the built-in passes)

    return dict(sorted(_REGISTRY.items()))


def get_pass_class(name: str) -> type[Pass]:
    passes = registered_passes()
    if name not in passes:
        raise PipelineError(f"unknown pass '{name}'; available: {', '.join(passes)}")
    return passes[name]
