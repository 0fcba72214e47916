"""Running what qcompile wrote: our artefact through the reference runtime (reference.py: `load_quantized`, with
the load-time lowerings for Ascend (npu.py) and torch's CPU int4/int8 kernels (cpu_prepack.py)), and the exported
ONNX decoder through onnxruntime (onnxruntime.py)."""

from qcompiler.runtime.reference import load_quantized

__all__ = ["load_quantized"]
