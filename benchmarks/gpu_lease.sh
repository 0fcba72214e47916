#!/usr/bin/env bash
# One GPU lease, prepared: the cuda target's kernels and decode loop (benchmarks/cuda_kernels.py) on the lent
# machine's own torch / Triton / transformers, no install (the package is laid out under a temporary folder as
# pyproject.toml maps it). Rows go to $OUT/rows.jsonl as they are measured, so a cut-off run still reports.
#     bash benchmarks/gpu_lease.sh            (then: python benchmarks/cuda_kernels.py --table-from rows.jsonl)
set -u
OUT=${OUT:-$(mktemp -d)}
site=$(mktemp -d)
cp -r qcompiler "$site/qcompiler" && cp -r kernels "$site/qcompiler/kernels" && cp -r passes "$site/qcompiler/passes"
export PYTHONPATH="$site" PYTHONUNBUFFERED=1 TRANSFORMERS_VERBOSITY=error HF_HUB_OFFLINE=1
PY=${PY:-python3}
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  $PY -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__,
'transformers', transformers.__version__)"; } > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
timeout "${KERNELS_S:-330}" $PY benchmarks/cuda_kernels.py --no-decode --jsonl "$OUT/rows.jsonl" "$@" > "$OUT/kernels.log" 2>&1
echo "kernels rc=$?"
timeout "${DECODE_S:-150}" $PY benchmarks/cuda_kernels.py --decode-only --jsonl "$OUT/rows.jsonl" > "$OUT/decode.log" 2>&1
echo "decode rc=$?"
grep -v '^{' "$OUT/decode.log" | tail -20
grep -c '"ms"' "$OUT/rows.jsonl"; grep -E 'error|"ok": false' "$OUT/rows.jsonl" | head -20
