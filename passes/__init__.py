"""Built-in passes, one per file. Importing this package registers them with the pass registry
(pm/base.py: every named Pass subclass registers itself)."""

from qcompiler.errors import PipelineError
from qcompiler.passes.activation.act_quant import InsertActQuant
from qcompiler.passes.fusion.fold_norm import FoldNormWeight
from qcompiler.passes.fusion.fuse_linears import FuseSharedInputLinears
from qcompiler.passes.kv_cache.kv_quant import InsertKVQuant
from qcompiler.passes.lowering.lower import LowerLinears
from qcompiler.passes.rotation.flatquant import FlatQuant
from qcompiler.passes.rotation.rotate import Rotate
from qcompiler.passes.smoothing.awq import AWQ
from qcompiler.passes.smoothing.smoothquant import SmoothQuant
from qcompiler.passes.sparsity.prune_magnitude import PruneMagnitude
from qcompiler.passes.sparsity.prune_wanda import PruneWanda
from qcompiler.passes.sparsity.sparsegpt import SparseGPT
from qcompiler.passes.weight.awq_gptq import AWQGPTQ
from qcompiler.passes.weight.awq_rtn import AWQRTN
from qcompiler.passes.weight.gptq import GPTQ
from qcompiler.passes.weight.quantize_head import QuantizeHead
from qcompiler.passes.weight.rtn import RTN
from qcompiler.passes.weight.sq_gptq import SQGPTQ
from qcompiler.passes.weight.sq_rtn import SQRTN
from qcompiler.passes.weight.tune_grids import TuneGrids
from qcompiler.pm.base import _REGISTRY, Pass


def registered_passes() -> dict[str, type[Pass]]:
    """Every pass by name: the built-ins (imported above) and any Pass subclass defined since."""
    return dict(sorted(_REGISTRY.items()))


def get_pass_class(name: str) -> type[Pass]:
    passes = registered_passes()
    if name not in passes:
        raise PipelineError(f"unknown pass '{name}'; available: {', '.join(passes)}")
    return passes[name]


__all__ = [
    "AWQ", "AWQGPTQ", "AWQRTN", "FlatQuant", "GPTQ", "InsertActQuant", "FoldNormWeight", "FuseSharedInputLinears", "InsertKVQuant", "LowerLinears", "PruneMagnitude", "PruneWanda", "Rotate", "SmoothQuant", "SparseGPT", "SQGPTQ", "SQRTN",
    "QuantizeHead", "RTN", "TuneGrids", "get_pass_class", "registered_passes",
]
