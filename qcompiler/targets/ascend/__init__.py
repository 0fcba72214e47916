"""The `ascend` target: Huawei Ascend NPUs through torch_npu, and msModelSlim's ascend v1 checkpoints.

Quantization and the artefact use the portable `qc::` ops (like every target); the Ascend specifics are
  - the export OUT/msmodelslim/ (export/msmodelslim.py), which vllm-ascend (`--quantization ascend`) and MindIE
    load: W8A8 (static), W8A8_DYNAMIC, W8A16, W4A16, W4A8_DYNAMIC (per channel or two-level groups),
    W4A4_DYNAMIC, W4A4_FLATQUANT_DYNAMIC (the flatquant pass), W8A8S / W16A16S (2:4), C8 KV cache, FLOAT
    fallbacks;
  - the NPU lowering (runtime/npu.py): qc:: linears → npu_quantize / npu_dynamic_quant /
    npu_quant_matmul / npu_weight_quant_batchmatmul, run by `load_quantized(out, lower_for="npu")`, on torch_npu
    when present and on the emulation (kernels/ascend/npu_ops.py) elsewhere (qc::linear_int_dynamic — W4A4,
    grouped W4A8 — and the KV-cache ops have no NPU mapping here: they run their torch oracle);
  - runtime/msmodelslim.py: any ascend v1 folder (ours or msModelSlim's) as a runnable model on the same ops;
  - `--target-option format=msmodelslim,lmdeploy` adds OUT/lmdeploy/ (export/lmdeploy.py): LMDeploy's PyTorch engine
    on Atlas 800T A2 (`--backend pytorch --device ascend`) loads the same smooth_quant W8A8 and AWQ W4A16 folders
    `lmdeploy lite smooth_quant / auto_awq --device npu` write (LMDeploy's Ascend guide).

What loads where (vllm-ascend at its 2026-08 head): W8A8, W8A8_DYNAMIC, W8A16 dense in vllm-ascend and MindIE;
dense W4A16 and W4A8_DYNAMIC in MindIE only (vllm-ascend registers them for MoE experts only); W8A8S / W16A16S
MindIE only; W4A4_DYNAMIC and W4A4_FLATQUANT_DYNAMIC in both. msModelSlim has no online Hadamard: rotations
here are residual-only, or folded into flatquant's per-layer Kronecker transform.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from qcompiler.errors import SchemeError
from qcompiler.export.artifact import SavedExporter
from qcompiler.export.lmdeploy import LmdeployFormat
from qcompiler.export.msmodelslim import MsModelSlimFormat
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

FORMAT = MsModelSlimFormat()
LMDEPLOY = LmdeployFormat()
FORMATS: dict[str, ServingFormat] = {f.name: f for f in (FORMAT, LMDEPLOY)}
LMDEPLOY_CONSUMERS = "LMDeploy PyTorch engine on Atlas 800T A2 (--device ascend: w8a8_dynamic, w4a16 AWQ g64/g128)"


@register_target("ascend")
class AscendTarget(Target):
    description = ("Huawei Ascend NPU: npu_quant_matmul (int8×int8, static or per-token), "
                   "npu_weight_quant_batchmatmul (int8/int4 weight-only); exports msModelSlim ascend v1")
    fuse_shared_input_linears = True
    online_rotation = False  # (compressed-tensors / msModelSlim layouts have no online Hadamard before a linear)
    learned_transforms = True  # (msModelSlim's W4A4_FLATQUANT_DYNAMIC: flatquant's L, R and clip ratio per layer)

    refuses = {
        "fp8": "the msModelSlim fp8 layout (WFP8AFP8_DYNAMIC) is not written yet",
        "per_tensor_weights": "the NPU weight-only kernels take per-channel or per-group scales",
    }

    def kernel_reason(self, scheme: QuantScheme) -> str | None:
        return FORMAT.unsupported_reason(scheme)  # (W16A16S, 2:4-sparse float weights: MindIE's sparse float type)

    def check_model(self, config: Any, scheme: QuantScheme) -> None:
        refuse_ragged_groups(self.name, "the NPU kernels and the ascend v1 loaders", config, scheme)
        refuse_mla_kv_cache(self.name, "msModelSlim's C8 layout", config, scheme)

    def consumers(self, scheme: QuantScheme) -> list[str]:
        if self.unsupported_reason(scheme) is not None:
            return []
        lmdeploy = [f"lmdeploy: {LMDEPLOY_CONSUMERS}"] if LMDEPLOY.unsupported_reason(scheme) is None else []
        return [self._msmodelslim_consumers(scheme), *lmdeploy]

    @staticmethod
    def _msmodelslim_consumers(scheme: QuantScheme) -> str:
        if scheme.sparsity:  # W8A8S / W16A16S: MindIE only
            return "msmodelslim: MindIE (W8A8S / W16A16S)"
        if scheme.activations is not None and scheme.activations.bits == 4:
            return "msmodelslim: vllm-ascend, MindIE (W4A4_DYNAMIC; W4A4_FLATQUANT_DYNAMIC with flatquant)"
        if scheme.weight_bits == 4:  # vllm-ascend (2026-08 head) registers its int4 types for MoE experts only
            kind = "W4A16" if scheme.weight_only else "W4A8_DYNAMIC"
            return f"msmodelslim: MindIE (vllm-ascend: {kind} for MoE experts only)"
        return "msmodelslim: vllm-ascend, MindIE"

    def learned_transform_reason(self, scheme: QuantScheme) -> str | None:
        for s in scheme.all_schemes():
            w, a = s.weights, s.activations
            if a is None or not a.dynamic or a.is_float:
                continue  # (flatquant leaves these layers alone)
            if w is None or w.bits != 4 or w.granularity != "channel" or not w.symmetric or a.bits != 4:
                return ("msModelSlim holds a learned transform as W4A4_FLATQUANT_DYNAMIC only (symmetric per-channel "
                        "int4 weights, int4 per-token activations): --scheme w4a4, or drop flatquant")
        return None

    def check_options(self, options: dict[str, str]) -> None:
        unknown = set(options) - {"format"}
        if unknown:
            raise SchemeError(f"target 'ascend' has no option {', '.join(sorted(unknown))}; options: "
                              f"format={'|'.join(FORMATS)} (comma-separated)")
        choose_formats(options, FORMATS, FORMAT.name)

    def check_export(self, scheme: QuantScheme, options: dict[str, str]) -> None:
        refuse_unwritable(self, scheme, choose_formats(options, FORMATS, FORMAT.name))

    def exporter(self, out_dir: Path, model: torch.nn.Module, options: dict[str, str], source: Path,
                 saved: SavedExporter | None = None) -> Any:
        return Exporters.of(out_dir, model, choose_formats(options, FORMATS, FORMAT.name), source, saved)
