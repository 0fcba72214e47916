"""Rerun the support-matrix tests (every family × scheme × target, tests/test_support_matrix.py) and record their
outcomes: qcompiler/targets/families.json and the README's family table. About fifteen minutes on two cores.

    python scripts/support_matrix.py [-k EXPR]    (a -k subset updates only the cells it ran)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RECORD = ROOT / "qcompiler" / "targets" / "families.json"


def main(argv: list[str]) -> int:
    sys.path.insert(0, str(ROOT / "tests"))
    from family_configs import FAMILIES

    from qcompiler.targets.matrix import MATRIX_SCHEMES

    with tempfile.TemporaryDirectory() as tmp:
        lines = Path(tmp) / "cells.jsonl"
        rc = subprocess.call([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "slow or not slow",
                              "tests/test_support_matrix.py::test_family_scheme_cells_equal_the_recorded_matrix",
                              *argv], cwd=ROOT, env={**os.environ, "QCOMPILE_MATRIX_OUT": str(lines)})
        if rc != 0:
            print("some matrix tests failed (a numerics check, not a refusal): nothing recorded", file=sys.stderr)
            return 1
        ran = [json.loads(line) for line in lines.read_text().splitlines()]
    old = json.loads(RECORD.read_text()) if RECORD.exists() else {"cells": {}}
    cells = {f.model_type: {s: old["cells"].get(f.model_type, {}).get(s, {}) for s in MATRIX_SCHEMES}
             for f in FAMILIES}
    for r in ran:
        cells[r["family"]][r["scheme"]] = r["cells"]
    record = {"families": [{"model_type": f.model_type, "row": f.row, "real": f.real} for f in FAMILIES],
              "cells": cells}
    RECORD.write_text(json.dumps(record, indent=1, ensure_ascii=False) + "\n")

    from qcompiler.targets.matrix import family_matrix

    readme = ROOT / "README.md"
    text = readme.read_text()
    begin, end = "<!-- family-matrix:begin -->\n", "\n<!-- family-matrix:end -->"
    head, rest = text.split(begin, 1)
    readme.write_text(head + begin + family_matrix() + end + rest.split(end, 1)[1])
    print(f"recorded {len(ran)} family × scheme tests in {RECORD.relative_to(ROOT)} and README.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
