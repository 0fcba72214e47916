"""Built-in passes, one per file. Importing this package registers them with the pass registry."""

from qcompiler.passes.activation.insert_act_quant import InsertActQuant
from qcompiler.passes.fusion.fold_norm_weight import FoldNormWeight
from qcompiler.passes.fusion.fuse_linears import FuseSharedInputLinears
from qcompiler.passes.kv_cache.insert_kv_quant import InsertKVQuant
from qcompiler.passes.lowering.lower_linears import LowerLinears
from qcompiler.passes.rotation.quarot import Rotate
from qcompiler.passes.smoothing.awq import AWQ
from qcompiler.passes.smoothing.smoothquant import SmoothQuant
from qcompiler.passes.sparsity.magnitude import PruneMagnitude
from qcompiler.passes.sparsity.sparsegpt import SparseGPT
from qcompiler.passes.sparsity.wanda import PruneWanda
from qcompiler.passes.weight.gptq import GPTQ
from qcompiler.passes.weight.rtn import RTN

__all__ = [
    "AWQ", "GPTQ", "InsertActQuant", "FoldNormWeight", "FuseSharedInputLinears", "InsertKVQuant", "LowerLinears", "PruneMagnitude", "PruneWanda", "Rotate", "SmoothQuant", "SparseGPT",
    "RTN",
]
