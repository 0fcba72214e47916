"""Pipelines from text: `"smoothquant{alpha=0.5},rtn{bits=4,group_size=64}"` or a YAML recipe.

YAML recipe forms:
    passes: "smoothquant{alpha=0.5},rtn{bits=4}"
or
    passes:
      - awq
      - gptq: {act_order: true}
      - lower
    overrides:                       # optional per-layer schemes (mixed precision), first match wins
      down: w8a16                    #   by graph role
      "model.layers.0.*": float      #   by checkpoint-name glob ("float" keeps the layer unquantized)
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from qcompiler.errors import PipelineError
from qcompiler.passes import get_pass_class
from qcompiler.pm.base import Pass

_ITEM = re.compile(r"\s*([A-Za-z_][\w\-]*)\s*(?:\{([^{}]*)\})?\s*(?:,|$)")


def _convert(pass_name: str, field: dataclasses.Field, raw: Any, hints: dict[str, Any]) -> Any:
    typ = hints[field.name]
    options = typing.get_args(typ) if typing.get_origin(typ) in (typing.Union, types.UnionType) else (typ,)
    if isinstance(raw, str):
        text = raw.strip()
        if text.lower() in ("none", "null") and type(None) in options:
            return None
        for t in options:
            try:
                if t is bool:
                    if text.lower() in ("true", "1", "yes"):
                        return True
                    if text.lower() in ("false", "0", "no"):
                        return False
                    continue
                if t in (int, float):
                    return t(text)
                if t is str or typing.get_origin(t) is typing.Literal:
                    if typing.get_origin(t) is typing.Literal and text not in typing.get_args(t):
                        continue
                    return text
            except ValueError:
                continue
        raise PipelineError(f"pass '{pass_name}': option {field.name}={raw!r} is not a valid {typ}")
    return raw


def make_pass(name: str, options: dict[str, Any]) -> Pass:
    cls = get_pass_class(name)
    fields = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, raw in options.items():
        if key not in fields:
            raise PipelineError(
                f"pass '{name}' has no option '{key}'; its options are: {', '.join(fields) or '(none)'}"
            )
        kwargs[key] = _convert(name, fields[key], raw, hints)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise PipelineError(f"pass '{name}': {e}") from e


def parse_pipeline(text: str) -> list[Pass]:
    text = text.strip()
    if not text:
        return []
    passes: list[Pass] = []
    pos = 0
    while pos < len(text):
        m = _ITEM.match(text, pos)
        if not m or m.end() == pos:
            raise PipelineError(f"cannot parse pipeline at character {pos}: {text[pos:pos + 30]!r}; "
                                "expected name{key=value,...} items separated by commas")
        name, body = m.group(1), m.group(2)
        options: dict[str, str] = {}
        if body and body.strip():
            for item in body.split(","):
                if "=" not in item:
                    raise PipelineError(f"pass '{name}': option '{item.strip()}' must look like key=value")
                k, v = item.split("=", 1)
                options[k.strip()] = v.strip()
        passes.append(make_pass(name, options))
        pos = m.end()
    return passes


@dataclass
class Recipe:
    passes: list[Pass] | None  # None: the scheme's default pipeline
    overrides: list[tuple[str, Any]] = field(default_factory=list)  # (pattern, QuantScheme | None)


def read_recipe(path: str | Path) -> Recipe:
    from qcompiler.errors import SchemeError
    from qcompiler.schemes import parse_override

    p = Path(path)
    if not p.is_file():
        raise PipelineError(f"recipe file '{p}' does not exist")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise PipelineError(f"recipe '{p}' is not valid UTF-8 YAML: {e}") from None
    overrides = []
    if isinstance(data, dict):
        unknown = set(data) - {"passes", "overrides"}
        if unknown:
            raise PipelineError(f"recipe '{p}': unknown keys {sorted(unknown)}; a recipe has 'passes' and 'overrides'")
        raw = data.get("overrides") or {}
        if not isinstance(raw, dict):
            raise PipelineError(f"recipe '{p}': 'overrides' maps layer patterns to scheme names")
        for pattern, scheme in raw.items():
            try:
                overrides.append(parse_override(f"{pattern}={scheme}"))
            except SchemeError as e:
                raise PipelineError(f"recipe '{p}': override {pattern!r}: {e}") from e
        if "passes" not in data:
            return Recipe(None, overrides)
    return Recipe(_recipe_passes(p, data), overrides)


def load_recipe(path: str | Path) -> list[Pass]:
    passes = read_recipe(path).passes
    if passes is None:
        raise PipelineError(f"recipe '{path}' has no 'passes'")
    return passes


def _recipe_passes(p: Path, data: Any) -> list[Pass]:
    items = data.get("passes") if isinstance(data, dict) else data
    if isinstance(items, str):
        return parse_pipeline(items)
    if not isinstance(items, list):
        raise PipelineError(f"recipe '{p}': expected a 'passes' list or string")
    passes = []
    for item in items:
        if isinstance(item, str):
            passes.append(make_pass(item, {}))
        elif isinstance(item, dict) and len(item) == 1:
            (name, opts), = item.items()
            passes.append(make_pass(name, dict(opts or {})))
        else:
            raise PipelineError(f"recipe '{p}': each pass is a name or a one-key mapping, got {item!r}")
    return passes


def format_pipeline(passes: list[Pass]) -> str:
    return ",".join(p.spec() for p in passes)
