"""sha256 of every file qcompile writes for a fixed set of tiny models, schemes and targets (one JSON line each).

A refactor that must keep exports byte-identical is checked by running this before and after and diffing:

    python scripts/export_digests.py > before.jsonl   # on the old commit
    python scripts/export_digests.py > after.jsonl    # on the new one
    diff before.jsonl after.jsonl

run.json (timings) is left out: it is the one file that differs between equal runs. The models are written under
a fixed folder (argument 1, default /tmp/qcompile-export-digests): qcompiler.json records the source model's path.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))

CASES = [  # (family, scheme, group size, target, target options, pipeline or None for the default)
    ("llama", "w8a16", None, "reference", {}, None),
    ("llama", "w4a16", 32, "reference", {}, "fuse_linears,gptq"),
    ("llama", "w8a8", None, "reference", {}, None),
    ("llama", "w8a8_dynamic", None, "cuda", {"format": "compressed-tensors"}, None),
    ("llama", "w4a16", 32, "cuda", {"format": "compressed-tensors,awq,gptq"}, "fuse_linears,gptq"),
    ("llama", "w8a8", None, "ascend", {}, None),
    ("llama", "w4a16", 32, "ascend", {}, None),
    ("llama", "w4a16", 32, "onnxruntime", {}, "fuse_linears,gptq"),
    ("qwen3", "w8a8c8", None, "ascend", {}, None),
    ("qwen3_moe", "w8a16", None, "cuda", {}, None),
]


def main() -> None:
    from tiny import TEXT, make_tiny_model

    from qcompiler.driver import QuantizeConfig, quantize
    from qcompiler.pm.pipeline import parse_pipeline
    from qcompiler.schemes import get_scheme

    root = Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/qcompile-export-digests")
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    models: dict[str, Path] = {}
    for i, (family, scheme, group, target, options, passes) in enumerate(CASES):
        if family not in models:
            extra = {"head_dim": 32} if family == "llama" else {}
            models[family] = make_tiny_model(root / family, family, **extra)
        out = root / f"out-{i}"
        quantize(QuantizeConfig(model=models[family], scheme=get_scheme(scheme, group_size=group), out=out,
                                target=target, target_options=options, calib_texts=[TEXT], num_samples=4,
                                seq_len=32, batch_size=2, progress=False,
                                passes=parse_pipeline(passes) if passes else None), log=lambda _: None)
        digests = {f.relative_to(out).as_posix(): hashlib.sha256(f.read_bytes()).hexdigest()
                   for f in sorted(out.rglob("*")) if f.is_file() and f.name != "run.json"}
        print(json.dumps({"case": [family, scheme, group, target, options, passes], "files": digests}), flush=True)


if __name__ == "__main__":
    main()
