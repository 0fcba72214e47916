"""The target interface and registry. Targets hold no algorithm maths: they say what they support,
whether they want fused linears, and which rewrite rules lower quantized patterns to their kernels."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import fx

from qcompiler.errors import SchemeError
from qcompiler.export.artifact import SavedExporter
from qcompiler.schemes import QuantScheme

if TYPE_CHECKING:
    from qcompiler.pm.rewrite import RewriteRule


class Target:
    name: str = ""
    description: str = ""
    fuse_shared_input_linears: bool = False
    consumer: str = ""  # what loads the output (README matrix); targets writing several formats override consumers()
    # whether the target's runtime and formats hold qc::online_rotation (QuaRot's online Hadamard before down_proj)
    online_rotation: bool = True

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

    def check(self, scheme: QuantScheme, options: dict[str, str]) -> None:
        """Everything refusable before any work: each layer scheme, the options, the output formats."""
        for s in scheme.all_schemes():
            self.validate(s)
        self.check_options(options)
        self.check_export(scheme, options)

    def check_export(self, scheme: QuantScheme, options: dict[str, str]) -> None:
        """Refuse a scheme the chosen output format(s) cannot hold (targets that write formats override)."""

    def export_refusal(self, scheme: QuantScheme) -> str | None:
        """Why none of the target's output formats can hold `scheme` although the target runs it (None: some can)."""
        return None

    def consumers(self, scheme: QuantScheme) -> list[str]:
        """Who loads this target's output for `scheme` (empty when the target cannot run it)."""
        return [self.consumer] if self.unsupported_reason(scheme) is None else []

    def check_options(self, options: dict[str, str]) -> None:
        """Refuse unknown target options (before any work)."""
        if options:
            raise SchemeError(f"target '{self.name}' takes no --target-option (got {', '.join(options)})")

    def check_model(self, config: Any, scheme: QuantScheme) -> None:
        """Refuse, before any work, a model (architecture, layer sizes) the target or its format cannot take."""

    def exporter(self, out_dir: Path, model: torch.nn.Module, options: dict[str, str], source: Path,
                 saved: SavedExporter | None = None) -> BlockExporter | None:
        """A writer of the target's own format into `out_dir` (the artefact's temporary folder), fed each lowered
        block; `source` is the input checkpoint folder (config, tokenizer). `saved`: continue from the state an
        earlier exporter of the same run saved (--resume) instead of starting. None: our artefact only."""
        return None


class BlockExporter(Protocol):
    """Receives lowered blocks in order while the driver runs; writes into the artefact's temporary folder.

    `save_state` records the exporter's progress after a block as JSON fields (binary parts as files whose
    names start with `tag`, in `folder`); the target's `exporter(..., saved=...)` continues from it. `finish`
    may run again after a kill part-way through it (a resumed run repeats it from the last block's state)."""

    def add_block(self, index: int, name: str, gm: fx.GraphModule) -> None: ...

    def save_state(self, folder: Path, tag: str) -> dict[str, Any]: ...

    def finish(self, model: torch.nn.Module, metadata: dict[str, str]) -> None: ...

    def abort(self) -> None: ...


def linear_input_sizes(config: Any) -> dict[str, int]:
    """in_features of a decoder's linears by kind, from a transformers config (attention output, MLP down)."""
    heads = getattr(config, "num_attention_heads", None)
    head_dim = getattr(config, "head_dim", None) or (config.hidden_size // heads if heads else None)
    sizes = {"hidden_size (q/k/v, gate/up)": config.hidden_size}
    if heads and head_dim:
        sizes["num_attention_heads × head_dim (o_proj)"] = heads * head_dim
    inter = getattr(config, "intermediate_size", None) or getattr(config, "moe_intermediate_size", None)
    if inter:
        sizes["intermediate_size (down_proj)"] = inter
    return sizes


def refuse_ragged_groups(target: str, consumer: str, config: Any, scheme: QuantScheme) -> None:
    """Serving kernels and their loaders need the weight group size to divide every layer's input size."""
    for s in scheme.all_schemes():
        if s.weights is None or s.weights.granularity != "group" or s.weights.group_size is None:
            continue
        g = s.weights.group_size
        for what, k in linear_input_sizes(config).items():
            if k % g:
                raise SchemeError(
                    f"target '{target}': group size {g} does not divide {what} = {k}, and {consumer} load only "
                    f"whole groups; choose a group size dividing {k} (e.g. --group-size {_divisor(k, g)}) or "
                    "per-channel scales (--group-size 0)"
                )


def refuse_oversized_groups(config: Any, scheme: QuantScheme) -> None:
    """A group size larger than every layer's input size would quantize per channel under a group scheme's name."""
    sizes = linear_input_sizes(config)
    for s in scheme.all_schemes():
        if s.weights is None or s.weights.granularity != "group" or s.weights.group_size is None:
            continue
        if s.weights.group_size > max(sizes.values()):
            raise SchemeError(
                f"group size {s.weights.group_size} is larger than every layer's input size "
                f"({', '.join(f'{k} = {v}' for k, v in sizes.items())}); choose a group size of at most "
                f"{max(sizes.values())}, or --group-size 0 for one scale per output channel"
            )


def refuse_mla_kv_cache(target: str, fmt: str, config: Any, scheme: QuantScheme) -> None:
    """A multi-head latent attention model (DeepSeek) caches a latent, for which `fmt` has no KV-cache scales."""
    if scheme.kv_cache is not None and getattr(config, "kv_lora_rank", None):
        raise SchemeError(f"target '{target}': {fmt} describes K/V caches, but this model's attention (MLA) caches "
                          "a compressed latent; quantize its KV cache with --target reference, or drop --kv-cache")


def _divisor(k: int, g: int) -> int:
    """The largest power of two ≤ g dividing k (what to suggest instead of g)."""
    d = 1
    while d * 2 <= g and k % (d * 2) == 0:
        d *= 2
    return d


_TARGETS: dict[str, Callable[[], Target]] = {}


def register_target(name: str) -> Callable[[type[Target]], type[Target]]:
    def deco(cls: type[Target]) -> type[Target]:
        cls.name = name
        _TARGETS[name] = cls
        return cls

    return deco


def registered_targets() -> dict[str, Callable[[], Target]]:
    import qcompiler.targets.ascend  # noqa: F401  (built-in targets register on import)
    import qcompiler.targets.cuda  # noqa: F401
    import qcompiler.targets.onnxruntime  # noqa: F401
    import qcompiler.targets.reference  # noqa: F401

    return dict(_TARGETS)


def get_target(name: str) -> Target:
    targets = registered_targets()
    if name not in targets:
        raise SchemeError(f"unknown target '{name}'; available: {', '.join(sorted(targets))}")
    return targets[name]()
