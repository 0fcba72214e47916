"""The scheme × target table of what loads where, generated from the registry (targets, their formats and
consumers), for `qcompile schemes --markdown` and the README (a test keeps the README's copy current)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

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


# ---------------------------------------------------------------- families × schemes × targets (issue 18)

# The matrix's columns: a scheme preset with the options its row of the seeds' tables uses (GPTQ for int4).
MATRIX_SCHEMES: dict[str, dict[str, Any]] = {
    "w8a16": {"preset": "w8a16"},
    "w4a16": {"preset": "w4a16", "group_size": 32, "algo": "gptq"},
    "w8a8": {"preset": "w8a8"},
    "w8a8_dynamic": {"preset": "w8a8_dynamic"},
    "w4a8": {"preset": "w4a8"},
    "w8a8s": {"preset": "w8a8s"},
    "w8a8c8": {"preset": "w8a8c8"},
}
FAMILY_TARGETS = ("reference", "cuda", "ascend", "onnxruntime")
_RECORD = Path(__file__).with_name("families.json")


def recorded_family_matrix() -> dict[str, Any]:
    """The outcomes tests/test_support_matrix.py recorded (written by scripts/support_matrix.py): `families`
    (model_type, row, real config, in the seeds' row order) and `cells[model_type][scheme][target]`, "ok" or a
    reason."""
    return json.loads(_RECORD.read_text())


def family_matrix() -> str:
    """The recorded family × scheme matrix as markdown: each cell lists the targets whose check passed (✓) and those
    that refused (✗ with a numbered reason below the table)."""
    rec = recorded_family_matrix()
    reasons: dict[str, int] = {}
    lines = ["| family | model_type (tiny config copies) | " + " | ".join(MATRIX_SCHEMES) + " |",
             "|---|---|" + "---|" * len(MATRIX_SCHEMES)]
    for fam in rec["families"]:
        cells = []
        for scheme in MATRIX_SCHEMES:
            # (a reason that names the family reads the same for every family: one footnote)
            outcome = {t: v.replace(f"'{fam['model_type']}'", "this architecture")
                       for t, v in rec["cells"][fam["model_type"]][scheme].items()}
            parts = []
            for target in FAMILY_TARGETS:
                value = outcome.get(target, "not run")
                if value == "ok":
                    parts.append(f"✓{_SHORT[target]}")
                else:
                    mark = "◐" if value.startswith("weights: ") else "✗"
                    parts.append(f"{mark}{_SHORT[target]}<sup>{reasons.setdefault(value, len(reasons) + 1)}</sup>")
            values = set(outcome.values())
            if len(values) == 1 and "ok" not in values:  # refused by every target for one reason
                parts = [f"✗<sup>{reasons[values.pop()]}</sup>"]
            cells.append(" ".join(parts))
        lines.append(f"| {fam['row']} | `{fam['model_type']}` ({fam['real']}) | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("R: reference target (our artefact = transformers' model with the artefact's weights, activation "
                 "and KV-cache grids), C: cuda (compressed-tensors loaded by transformers = ours), A: ascend (msModelSlim folder "
                 "run as its NPU call sequences = ours), O: onnxruntime (the exported decoder, prompt and KV-cache "
                 "decode = ours). ◐: the weights were checked, the client could not run here.")
    for reason, n in reasons.items():
        lines.append(f"{n}. {reason}")
    return "\n".join(lines)


_SHORT = {"reference": "R", "cuda": "C", "ascend": "A", "onnxruntime": "O"}
