"""The `cuda` target: NVIDIA GPUs through torch's library kernels and ours, and the checkpoints CUDA serving engines
load.

Lowering is the shared linear rules (kernel ops `qc::linear_woq`, `qc::linear_w8a8`, `qc::linear_fp8`,
`qc::linear_int_dynamic` for w4a8 group scales); their CUDA implementations pick a kernel per call from
kernels/cuda/table.py — tinygemm for int4 weight-only at decode sizes (the layout made at load time,
runtime/cuda_prepack.py), dequantize + cuBLAS, cuBLASLt int8 / fp8 GEMMs, our Triton GEMMs where no library
kernel fits (the oracle off CUDA). No int4 × int4 GEMM: w4a4 is refused.
Linears sharing an input are fused (one GEMM for q/k/v, one for gate/up); the exports split them back.

Export (`--target-option format=compressed-tensors[,awq][,gptq]`), each into its own folder of the artefact:
  OUT/compressed-tensors/  pack-quantized (w4a16, w8a16, w4a8) / int-quantized (w8a8, w8a8_dynamic) /
                           float-quantized (fp8, fp8_static), dense 2:4 with sparsity_config (w8a8s, w16a16s),
                           kv_cache_scheme per tensor / attn_head: vLLM, SGLang,
                           transformers on the CPU (`vllm serve OUT/compressed-tensors`)
  OUT/awq/                 AutoAWQ gemm (int4 groups): LMDeploy TurboMind, vLLM, SGLang
  OUT/gptq/                GPTQ v1 (int4/int8 weight-only): vLLM, SGLang, TurboMind
  OUT/lmdeploy/            LMDeploy: smooth_quant W8A8 / fp8 (PyTorch engine), AWQ int4 g64/g128 (TurboMind)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from qcompiler.errors import SchemeError
from qcompiler.export.artifact import SavedExporter
from qcompiler.export.autoawq import AwqFormat, GptqFormat
from qcompiler.export.compressed_tensors import CompressedTensorsFormat
from qcompiler.export.lmdeploy import LmdeployFormat
from qcompiler.export.serving import Exporters, ServingFormat
from qcompiler.schemes import QuantScheme
from qcompiler.targets.base import (
    Target,
    choose_formats,
    refuse_mla_kv_cache,
    refuse_ragged_groups,
    refuse_unwritable,
    register_target,
)

FORMATS: dict[str, ServingFormat] = {f.name: f for f in (CompressedTensorsFormat(), AwqFormat(), GptqFormat(),
                                                          LmdeployFormat())}
DEFAULT_FORMAT = "compressed-tensors"


def chosen_formats(options: dict[str, str]) -> list[ServingFormat]:
    return choose_formats(options, FORMATS, DEFAULT_FORMAT)


@register_target("cuda")
class CudaTarget(Target):
    description = ("NVIDIA GPU: tinygemm / cuBLAS weight-only, cuBLASLt and Triton int8×int8 and fp8 GEMMs; exports "
                   "compressed-tensors (vLLM, SGLang), AWQ (LMDeploy), GPTQ")
    fuse_shared_input_linears = True
    online_rotation = False  # (compressed-tensors / msModelSlim layouts have no online transform before a linear)

    # the Triton scaled GEMM: int8 × int8 (int4 codes held in int8 for w4a8), or e4m3 × e4m3 for fp8
    refuses = {"w4a4": "no int4 × int4 GEMM (neither our Triton kernels nor vLLM's compressed-tensors integer W4A4)"}

    def check_options(self, options: dict[str, str]) -> None:
        unknown = set(options) - {"format"}
        if unknown:
            raise SchemeError(f"target 'cuda' has no option {', '.join(sorted(unknown))}; options: "
                              f"format={'|'.join(FORMATS)} (comma-separated)")
        chosen_formats(options)

    def check_export(self, scheme: QuantScheme, options: dict[str, str]) -> None:
        refuse_unwritable(self, scheme, chosen_formats(options))

    def check_model(self, config: Any, scheme: QuantScheme) -> None:
        refuse_ragged_groups(self.name, "compressed-tensors, AWQ and GPTQ", config, scheme)
        refuse_mla_kv_cache(self.name, "compressed-tensors' kv_cache_scheme", config, scheme)

    def export_refusal(self, scheme: QuantScheme) -> str | None:
        reasons = [f"{f.name}: {f.unsupported_reason(scheme)}" for f in FORMATS.values()]
        return None if any(f.unsupported_reason(scheme) is None for f in FORMATS.values()) else "; ".join(reasons)

    def consumers(self, scheme: QuantScheme) -> list[str]:
        if self.unsupported_reason(scheme) is not None:
            return []
        return [f"{f.name}: {f.consumers}" for f in FORMATS.values() if f.unsupported_reason(scheme) is None]

    def exporter(self, out_dir: Path, model: torch.nn.Module, options: dict[str, str], source: Path,
                 saved: SavedExporter | None = None) -> Any:
        return Exporters.of(out_dir, model, chosen_formats(options), source, saved)
