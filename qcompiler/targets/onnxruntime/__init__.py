"""The `onnxruntime` target: ONNX Runtime on the CPU (MatMulNBits, int8 GEMMs, GroupQueryAttention).

It quantizes through the same passes and `qc::` kernel ops as the reference target, then emits each lowered
block into one ONNX decoder with a KV cache (export/onnx/decoder.py) next to our artefact, so the folder is both a
qcompiler artefact and an onnxruntime-genai model folder (model.onnx, model.onnx.data, genai_config.json).

Options (`--target-option key=value`):
  accuracy_level  MatMulNBits compute: 4 (default) = int8 activations per block (onnxruntime's fast CPU
                  path, the genai builder's default), 0 = float activations (exactly our dequantize-then-GEMM)
  w8a8_dynamic    matmulnbits (default): int8 weights × int8 activations in MatMulNBits (bits=8,
                  accuracy_level=4; activations quantized per token per block of K, onnxruntime's fast CPU
                  kernel) | exact: per-token quantization in ONNX ops + MatMulInteger (our oracle's numbers,
                  ~1.4× slower decode on the demo model)
  lm_head_bits    8 (default) | 4 | float: the pipeline quantizes the output projection (the quantize_head pass:
                  RTN, symmetric blocks of 32), written as MatMulNBits, or keeps it float. The head is a fifth of a small model's weights and dominates its decode time; int8
                  blocks of 32 cost ~0.1 % perplexity on the demo model (the genai builder uses int4 here)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from qcompiler.errors import SchemeError
from qcompiler.export.artifact import SavedExporter
from qcompiler.export.onnx.emit import EmitOptions, dividing_block
from qcompiler.schemes import QuantScheme
from qcompiler.targets.base import Target, register_target


def emit_options(options: dict[str, str]) -> EmitOptions:
    return EmitOptions(accuracy_level=int(options.get("accuracy_level", "4")),
                       w8a8_dynamic=options.get("w8a8_dynamic", "matmulnbits"))


@register_target("onnxruntime")
class OnnxRuntimeTarget(Target):
    description = ("ONNX Runtime CPU: MatMulNBits (int4/int8 weight-only), MatMulInteger (int8 per-token), "
                   "QDQ (int8 static); exports model.onnx + genai_config.json")
    fuse_shared_input_linears = True
    consumer = "onnxruntime, onnxruntime-genai (model.onnx)"
    options = {"accuracy_level": ("0", "4"), "lm_head_bits": ("float", "8", "4"),
               "w8a8_dynamic": ("matmulnbits", "exact")}

    # (2:4-sparse float weights, w16a16s, run as dense MatMuls: no sparse CPU kernel)
    refuses = {
        "fp8": "onnxruntime's CPU kernels have no fp8 GEMM",
        "w4a4": "onnxruntime has no int4 × int4 GEMM",
        "w4a8": "activation quantization needs symmetric per-channel int8 weights (no int4 × int8 GEMM here)",
        "per_tensor_weights": "MatMulNBits has no per-tensor weight scale",
    }

    def kernel_reason(self, scheme: QuantScheme) -> str | None:
        w = scheme.weights
        if scheme.activations is None and w is not None and w.granularity == "group" \
                and dividing_block(w.group_size) is None:  # type: ignore[arg-type]
            return f"MatMulNBits needs a group size divisible by a power of two ≥ 16, not {w.group_size}"
        return None

    def check_options(self, options: dict[str, str]) -> None:
        for k, v in options.items():
            if k not in self.options or v not in self.options[k]:
                raise SchemeError(
                    f"target 'onnxruntime' has no option {k}={v}; options: "
                    + "; ".join(f"{n}: {'|'.join(c)}" for n, c in self.options.items())
                )

    def check_export(self, scheme: QuantScheme, options: dict[str, str]) -> None:
        kv = scheme.kv_cache
        if kv is not None and (kv.dynamic or not kv.symmetric):
            raise SchemeError(f"target 'onnxruntime': GroupQueryAttention's quantized KV cache takes calibrated "
                              f"symmetric scales, not {kv.describe()}; use --kv-cache int8, int8-tensor, int8-head "
                              "or int4[-head|-tensor]")

    def check_model(self, config: Any, scheme: QuantScheme) -> None:
        from qcompiler.export.onnx.decoder import check_decoder_config

        check_decoder_config(config, scheme)

    def exporter(self, out_dir: Path, model: torch.nn.Module, options: dict[str, str], source: Path,
                 saved: SavedExporter | None = None) -> Any:
        from qcompiler.export.onnx.decoder import DecoderExporter

        return DecoderExporter(out_dir, model, emit_options(options), saved=saved)

    def head_bits(self, options: dict[str, str]) -> int | None:
        self.check_options(options)  # (asked while the pipeline is planned, before the target's own check)
        head = options.get("lm_head_bits", "8")
        return None if head == "float" else int(head)
