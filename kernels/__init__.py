"""Quantized kernels: op declarations (ops.py), the pure-torch oracle (reference.py), weight packing
(packing.py) and per-device implementations (cpu/, later cuda/ and ascend/).

Importing this package registers the `qc::` ops with torch.library.
"""

from qcompiler.kernels import ops as ops  # noqa: F401  (registers torch.ops.qc.*)
