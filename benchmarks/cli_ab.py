"""A/B of `qcompile quant` between two source trees (e.g. main and a worktree of an older commit), alternating.

    git worktree add /tmp/base <commit>
    python benchmarks/cli_ab.py --a /tmp/base --b . --rounds 2 -- \\
        --model demo --scheme w4a16 --group-size 64 --algo awq

Each round runs the command once from each tree (`python -m qcompiler.cli quant ... --out <tmp>` with the tree first on
PYTHONPATH), A then B in odd rounds and B then A in even ones, so a machine that drifts during the run weighs on both.
JSON lines on stdout, one per run: the tree, the pipeline, quantize_seconds and phase_seconds from run.json, the
process's peak RSS, and whether its block files are byte-identical to the other tree's in the same round. `--eval`
adds `qcompile eval` of the last round's two outputs (perplexity is deterministic for equal files).
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

# the CLI in-process, so that the process's own peak RSS is read at its exit (RUSAGE_CHILDREN keeps only the largest
# child so far)
# qcompiler.passes and qcompiler.kernels are the tree's top-level passes/ and kernels/ (pyproject's package-dir): an
# editable install maps them to the installed checkout whatever PYTHONPATH says, so the wrapper loads them from the tree
_WRAPPER = ("import importlib.util, os, resource, runpy, sys\n"
            "import qcompiler\n"
            "for name in ('kernels', 'passes'):\n"
            "    path = os.path.join(os.getcwd(), name)\n"
            "    spec = importlib.util.spec_from_file_location('qcompiler.' + name, os.path.join(path, '__init__.py'),\n"
            "                                                  submodule_search_locations=[path])\n"
            "    module = importlib.util.module_from_spec(spec)\n"
            "    sys.modules['qcompiler.' + name] = module\n"
            "    setattr(qcompiler, name, module)\n"
            "    spec.loader.exec_module(module)\n"
            "print('passes_from=' + sys.modules['qcompiler.passes'].__file__, file=sys.stderr)\n"
            "sys.argv = ['qcompile', *sys.argv[1:]]\n"
            "try:\n"
            "    runpy.run_module('qcompiler.cli', run_name='__main__')\n"
            "finally:\n"
            "    print(f'peak_rss_kb={resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}', file=sys.stderr)\n")


def _quant(tree: Path, args: list[str], out: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree), "TRANSFORMERS_VERBOSITY": "error",
           "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    done = subprocess.run([sys.executable, "-c", _WRAPPER, "quant", *args, "--out", str(out), "--no-progress"],
                          cwd=tree, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{tree}: qcompile quant failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
    run = json.loads((out / "run.json").read_text())
    pipeline = re.search(r"pipeline: (\S+)", done.stdout + done.stderr)
    rss = re.search(r"peak_rss_kb=(\d+)", done.stderr)
    passes_from = re.search(r"passes_from=(\S+)", done.stderr)
    if passes_from is None or not Path(passes_from.group(1)).resolve().is_relative_to(tree):
        sys.exit(f"{tree}: the run did not load this tree's passes ({passes_from and passes_from.group(1)})")
    return {"tree": str(tree), "pipeline": pipeline.group(1) if pipeline else None,
            "quantize_s": run["quantize_seconds"], "phases": run["phase_seconds"],
            "peak_rss_mb": round(int(rss.group(1)) / 1024) if rss else None}


def _same_files(a: Path, b: Path) -> bool:
    files = sorted(p.name for p in a.glob("*.safetensors"))
    return files == sorted(p.name for p in b.glob("*.safetensors")) and all(
        filecmp.cmp(a / f, b / f, shallow=False) for f in files)


def _eval(tree: Path, out: Path) -> str:
    env = {**os.environ, "PYTHONPATH": str(tree), "TRANSFORMERS_VERBOSITY": "error"}
    done = subprocess.run([sys.executable, "-c", _WRAPPER, "eval", str(out)], cwd=tree, env=env,
                          capture_output=True, text=True)
    line = re.search(r"perplexity [+-][^\n]*", done.stdout)
    return line.group(0) if line else done.stderr.strip()[-300:]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--a", type=Path, required=True, help="tree A (e.g. a worktree of the older commit)")
    ap.add_argument("--b", type=Path, required=True, help="tree B")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--eval", action="store_true", help="qcompile eval the last round's outputs")
    ap.add_argument("quant_args", nargs=argparse.REMAINDER, help="-- then the arguments of qcompile quant (no --out)")
    a = ap.parse_args()
    args = [x for x in a.quant_args if x != "--"]
    trees = {"A": a.a.resolve(), "B": a.b.resolve()}
    with tempfile.TemporaryDirectory(prefix="cli-ab-") as tmp:
        for r in range(1, a.rounds + 1):
            order = ["A", "B"] if r % 2 else ["B", "A"]
            outs = {k: Path(tmp) / f"round{r}-{k}" for k in order}
            rows = {k: _quant(trees[k], args, outs[k]) for k in order}
            same = _same_files(outs["A"], outs["B"])
            for k in order:
                print(json.dumps({"round": r, "side": k, **rows[k], "files_identical_to_other_side": same}), flush=True)
            if r == a.rounds and a.eval:
                for k in ("A", "B"):
                    print(json.dumps({"round": r, "side": k, "eval": _eval(trees[k], outs[k])}), flush=True)


if __name__ == "__main__":
    main()
