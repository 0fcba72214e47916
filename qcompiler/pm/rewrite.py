"""Rewrite rules: pattern → check → rewrite, as data.

`matches(node)` is the cheap structural pattern; `check(gm, node)` returns a MatchResult that says why a
rule does not apply (kept for reports and tests); `rewrite(gm, node)` performs the change. A rule keeps no
state between check and rewrite. Rule sets are plain sequences and compose by concatenation.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from torch import fx


@dataclass(frozen=True)
class MatchResult:
    ok: bool
    reason: str = ""

    def __bool__(self) -> bool:
        return self.ok


MATCH = MatchResult(True)


def fail(reason: str) -> MatchResult:
    return MatchResult(False, reason)


class RewriteRule:
    name: str = "rule"

    def matches(self, node: fx.Node) -> bool:
        raise NotImplementedError

    def check(self, gm: fx.GraphModule, node: fx.Node) -> MatchResult:
        return MATCH

    def rewrite(self, gm: fx.GraphModule, node: fx.Node) -> None:
        raise NotImplementedError


@dataclass
class RewriteReport:
    applied: dict[str, int] = field(default_factory=dict)
    rejected: dict[str, str] = field(default_factory=dict)  # node name -> "rule: reason"

    @property
    def total(self) -> int:
        return sum(self.applied.values())


def apply_rules(gm: fx.GraphModule, rules: Sequence[RewriteRule]) -> RewriteReport:
    """Apply the first matching rule whose check passes to every node, once, in graph order."""
    report = RewriteReport()
    for node in list(gm.graph.nodes):
        if getattr(node, "_erased", False):  # erased by an earlier rewrite
            continue
        reasons: list[str] = []
        for rule in rules:
            if not rule.matches(node):
                continue
            m = rule.check(gm, node)
            if m:
                rule.rewrite(gm, node)
                report.applied[rule.name] = report.applied.get(rule.name, 0) + 1
                reasons = []
                break
            reasons.append(f"{rule.name}: {m.reason}")
        if reasons:
            report.rejected[node.name] = "; ".join(reasons)
    return report
