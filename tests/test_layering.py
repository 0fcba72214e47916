"""The import layering of the package, read from the source (an AST walk, no import): every module imports only
modules of its own layer or below, and no modules import each other in a loop. Imports under
`if TYPE_CHECKING:` are annotations only and do not count.

    cli
    driver (hf, onnx, fallback, plan), eval
    runtime                       (loads what was written: reference, onnxruntime, npu, msmodelslim)
    targets                       (what a backend runs: checks, lowering rules, exporters it writes with)
    export formats, pm.pipeline   (serving formats, ONNX, the artefact; pipeline strings -> passes)
    passes                        (one per file; lowering rules included)
    frontends, pass infrastructure (pm.base / manager / rewrite)
    calib
    ir                            (the graph, its analysis, records and the surgery passes and runtime share)
    kernels                       (qc:: op schemas, oracles, packing)
    algorithms                    (pure tensor maths: GPTQ, AWQ, sparsity, Hadamard)
    schemes, numerics
    errors, files, memory, distributed, synthetic, demo
"""

from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx

ROOT = Path(__file__).parent.parent
SOURCES = {"qcompiler": ROOT / "qcompiler", "qcompiler.passes": ROOT / "passes", "qcompiler.kernels": ROOT / "kernels"}

LAYERS = [  # lowest first; a module's layer is that of the longest prefix listed
    ("qcompiler.errors", "qcompiler.files", "qcompiler.memory", "qcompiler.distributed", "qcompiler.synthetic",
     "qcompiler.demo", "qcompiler"),
    ("qcompiler.schemes", "qcompiler.numerics"),
    ("qcompiler.algorithms",),
    ("qcompiler.kernels",),
    ("qcompiler.ir",),
    ("qcompiler.calib",),
    ("qcompiler.frontends", "qcompiler.pm.base", "qcompiler.pm.manager", "qcompiler.pm.rewrite", "qcompiler.pm"),
    ("qcompiler.passes",),
    ("qcompiler.export", "qcompiler.pm.pipeline"),
    ("qcompiler.targets",),
    ("qcompiler.runtime",),
    ("qcompiler.driver", "qcompiler.eval"),
    ("qcompiler.cli",),
]


def _modules() -> dict[str, Path]:
    out = {}
    for package, folder in SOURCES.items():
        for f in folder.rglob("*.py"):
            rel = f.relative_to(folder).with_suffix("")
            parts = [] if rel.parts == ("__init__",) else list(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
            name = ".".join([package, *parts])
            if name.startswith("qcompiler.passes") and package == "qcompiler" or name.startswith(
                    "qcompiler.kernels") and package == "qcompiler":
                continue
            out[name] = f
    return out


def _layer(module: str) -> int:
    best, layer = -1, -1
    for i, prefixes in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > best:
                best, layer = len(p), i
    assert layer >= 0, f"{module} has no layer in tests/test_layering.py"
    return layer


def _imports(path: Path, modules: set[str]) -> set[str]:
    """Our modules imported by the file (anywhere in it, except under `if TYPE_CHECKING:`)."""
    tree = ast.parse(path.read_text())
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    found = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{a.name}" for a in node.names] + [node.module]
        for name in names:
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name and name.startswith("qcompiler"):
                found.add(name)
    return found


def _graph() -> nx.DiGraph:
    modules = _modules()
    g = nx.DiGraph()
    for name, path in modules.items():
        g.add_node(name)
        for dep in _imports(path, set(modules)):
            if dep != name and not name.startswith(dep + "."):  # (a module's own package __init__ runs first)
                g.add_edge(name, dep)
    return g


def test_every_import_goes_down_the_layers():
    upward = [f"{a} (layer {_layer(a)}) imports {b} (layer {_layer(b)})" for a, b in _graph().edges
              if _layer(b) > _layer(a)]
    assert not upward, "\n".join(upward)


def test_no_import_loops():
    g = _graph()
    loops = [c for c in nx.simple_cycles(g) if len(c) > 1]
    assert not loops, "\n".join(" -> ".join(c) for c in loops[:10])


def test_nothing_outside_passes_imports_a_pass_module():
    """Passes are reached through the registry (qcompiler.passes) and targets use the lowering rules; exporters,
    the runtime and the driver read typed records (qcompiler/ir/records.py), never a pass's internals."""
    allowed = {"qcompiler.passes.lowering.linear_rules"}  # (the lowering layer: targets' rules)
    offenders = [f"{a} imports {b}" for a, b in _graph().edges
                 if b.startswith("qcompiler.passes.") and not a.startswith("qcompiler.passes") and b not in allowed]
    assert not offenders, "\n".join(offenders)
