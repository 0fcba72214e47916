"""Reading files that other people made, and writing JSON that every reader accepts.

Everything qcompile reads from disk — a model's config and index, a recipe, a stats-cache entry, the state of
an unfinished run — may be truncated, edited or planted. These helpers turn each way such a file can be wrong
into one `QCompilerError` naming the file and the fix, and check every name read from a file before it is
joined to a folder: a name read back must stay inside the folder it is meant for.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path, PurePosixPath
from typing import Any

from qcompiler.errors import QCompilerError

# a plain file name: no separators, no '..', no leading dot tricks beyond ordinary hidden names
_PLAIN = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+-]{0,254}")


def read_json(path: Path, what: str, error: type[QCompilerError], expect: type = dict) -> Any:
    """The JSON value in `path`, which must be an `expect` (dict or list); every other case is `error` naming
    the file: missing, unreadable, not UTF-8, not JSON, or JSON of another type."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise error(f"'{path}' ({what}) does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise error(f"'{path}' ({what}) cannot be read: {e}") from None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise error(f"'{path}' ({what}) is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg}); "
                    "restore the file from its source") from None
    except RecursionError:
        raise error(f"'{path}' ({what}) nests too deeply to be a {what}; restore the file from its source") from None
    if not isinstance(value, expect):
        raise error(f"'{path}' ({what}) holds a JSON {type(value).__name__}, not a JSON "
                    f"{'object' if expect is dict else expect.__name__}; restore the file from its source")
    return value


def plain_file_name(name: object, where: str, error: type[QCompilerError], fix: str = "remove that file") -> str:
    """`name` if it is a plain file name (no folder part, no '..', not absolute); else `error` saying `fix`."""
    if not isinstance(name, str) or not _PLAIN.fullmatch(name) or name in (".", ".."):
        raise error(f"{where}: {name!r} is not a plain file name, so it was edited or planted; {fix}")
    return name


def relative_file_name(name: object, where: str, error: type[QCompilerError]) -> str:
    """`name` if it is a relative path that stays inside its folder (no absolute path, no '..' part, no empty
    or backslash parts); else `error` naming it."""
    if not isinstance(name, str) or not name or "\\" in name or "\0" in name:
        raise error(f"{where}: {name!r} is not a relative file name inside the folder")
    p = PurePosixPath(name)
    if p.is_absolute() or any(part in ("..", "") for part in name.split("/")):
        raise error(f"{where}: file name {name!r} points outside the folder; only names inside it are read")
    return name


def json_safe(value: Any) -> Any:
    """`value` with every non-finite float replaced by None: NaN and ±Infinity are not JSON, and strict
    readers (browsers, Go, Rust, jq) refuse a file that holds them. (An infinite SQNR means an exact layer.)"""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


def dumps(value: Any, indent: int | None = 1) -> str:
    """Standard JSON (no NaN / Infinity), objects of other types written as their str()."""
    return json.dumps(json_safe(value), indent=indent, default=str, allow_nan=False)
