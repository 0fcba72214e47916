"""The target interface and registry. Targets hold no algorithm maths: they say what they support,
whether they want fused linears, and which rewrite rules lower quantized patterns to their kernels."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

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


_TARGETS: dict[str, Callable[[], Target]] = {}


def register_target(name: str) -> Callable[[type[Target]], type[Target]]:
    def deco(cls: type[Target]) -> type[Target]:
        cls.name = name
        _TARGETS[name] = cls
        return cls

    return deco


def registered_targets() -> dict[str, Callable[[], Target]]:
    import qcompiler.targets.reference  # noqa: F401  (built-in targets register on import)

    return dict(_TARGETS)


def get_target(name: str) -> Target:
    targets = registered_targets()
    if name not in targets:
        raise SchemeError(f"unknown target '{name}'; available: {', '.join(sorted(targets))}")
    return targets[name]()
