"""The documentation's code runs as written: the README's Python example (on the demo model) and the pass written in
docs/architecture.md; the README stays a short guide whose links resolve."""

from __future__ import annotations

import re
import sys
import types
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).parent.parent


def _python_blocks(path: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S)


def test_readme_is_a_short_guide_whose_links_resolve():
    text = (ROOT / "README.md").read_text()
    # the prose stays short; the generated tables (support matrices, kept current by their own tests) are the product
    prose = re.sub(r"<!-- ([a-z-]+):begin -->.*?<!-- \1:end -->", "", text, flags=re.S)
    assert len(prose.splitlines()) <= 150
    links = re.findall(r"\]\(([^)#]+)\)", text)
    assert links and all((ROOT / link).is_file() for link in links), [link for link in links if not (ROOT / link).is_file()]
    assert "qcompile quant --model demo" in text and "bash scripts/test.sh" in text


@pytest.mark.demo
@pytest.mark.slow
def test_the_readme_python_example_runs_as_written(tmp_path, monkeypatch):
    pytest.importorskip("gguf")
    (block,) = _python_blocks(ROOT / "README.md")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(block, "README.md", "exec"), namespace)  # noqa: S102 (our own documentation)
    logits = namespace["logits"]
    assert logits.shape[:2] == (1, 6) and torch.isfinite(logits).all()
    assert (tmp_path / "readme-example-out" / "manifest.json").is_file()


def test_the_pass_in_the_architecture_guide_runs(tiny_llama, tmp_path, calib_text, monkeypatch):
    from qcompiler.driver import QuantizeConfig, quantize
    from qcompiler.pm.pipeline import parse_pipeline
    from qcompiler.schemes import get_scheme

    (block,) = _python_blocks(ROOT / "docs" / "architecture.md")
    module = types.ModuleType("docs_architecture")  # (dataclasses look their class's module up)
    monkeypatch.setitem(sys.modules, module.__name__, module)
    exec(compile(block, "docs/architecture.md", "exec"), module.__dict__)  # noqa: S102
    d = quantize(QuantizeConfig(model=tiny_llama, scheme=get_scheme("w8a16"), out=tmp_path / "q",
                                passes=parse_pipeline("input_range{top=2},fuse_linears,rtn"), calib_texts=[calib_text],
                                num_samples=2, seq_len=32, batch_size=2, progress=False), log=lambda _: None)
    report = d["block_report"]["model.layers.0"]["passes"]["input_range"]["largest_input"]
    assert len(report) == 2 and all(v > 0 for v in report.values())
    assert d["pipeline"].startswith("input_range{top=2},fuse_linears,rtn")
