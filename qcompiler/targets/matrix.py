"""The scheme × target table of what loads where, generated from the registry (targets, their formats and
consumers), for `qcompile schemes --markdown` and the README (a test keeps the README's copy current)."""

from __future__ import annotations

from qcompiler.schemes import PRESETS
from qcompiler.targets import registered_targets

TARGET_ORDER = ("reference", "onnxruntime", "cuda", "ascend")


def support_matrix() -> str:
    targets = {n: f() for n, f in registered_targets().items()}
    names = [n for n in TARGET_ORDER if n in targets] + sorted(set(targets) - set(TARGET_ORDER))
    lines = ["| scheme | " + " | ".join(f"`--target {n}`" for n in names) + " |",
             "|---|" + "---|" * len(names)]
    for scheme_name, scheme in PRESETS.items():
        cells = []
        for n in names:
            consumers = targets[n].consumers(scheme)
            reason = targets[n].unsupported_reason(scheme) or targets[n].export_refusal(scheme)
            cells.append("<br>".join(consumers) if consumers else f"✗ {reason}")
        lines.append(f"| {scheme_name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
