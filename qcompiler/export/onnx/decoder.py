"""The whole decoder as one ONNX model with a KV cache, written block by block as the driver lowers them,
plus `genai_config.json` so onnxruntime-genai generates from the folder.

    input_ids [B, S], attention_mask [B, T], past_key_values.{i}.key/value [B, Hkv, P, D]
      → Gather(embed) → block 0 … block L−1 → RMSNormalization → lm_head
      → logits [B, S, V], present.{i}.key/value [B, Hkv, T, D]

Each block is the lowered FX graph emitted rule by rule (emit.py), except its attention core: the nodes from
the q/k/v projections' outputs (head reshapes, rotary embedding, GQA repetition, scaled dot-product
attention) to the o projection's input become one com.microsoft::GroupQueryAttention (rotary applied in the
op from cos/sin caches computed by the model's own rotary module, past/present cache, causal mask from
seqlens_k = Σ attention_mask − 1 and the total length). The attention pattern is checked on the graph, not
assumed: a q/k path with anything but reshapes, per-head RMSNorms (Qwen3's and Gemma 3's q/k norms, emitted before
the op on [B, S, H, D]) and the rotary arithmetic is refused with the reason. A fused q|k|v projection (split, or
sliced as Phi-3's qkv_proj) is the op's packed input after its slices are checked. Per layer: the window
(local_window_size: a sliding layer of Gemma 3 / EXAONE 4 / Mistral, −1 on a full one), the cos/sin caches of its
layer type (Gemma 3 rotates sliding and full layers with different bases), and no rotation at all on a layer whose
q/k paths have none (NoPE: SmolLM3's every 4th layer, EXAONE 4's global ones: do_rotary=0); partial and
interleaved rotary (GLM: cos/sin repeated pairwise in the block) as GroupQueryAttention's rotary_interleaved with a
shorter cache. Where the op cannot rotate the heads itself — q/k norms after the rotation (HunYuan), a rotated part
that is not a multiple of 16 dims (GPT-NeoX), heads interleaved in a fused projection (GPT-NeoX, Falcon's multi-query
split) — the block's own q/k arithmetic is emitted, its cos/sin inputs gathered from the model's rotary tables at each
token's position, and the op runs with do_rotary=0 on rotated inputs (its cache then holds rotated keys, as the
model's own cache does). Where SDPA cannot express the attention, transformers' eager form is matched instead (Gemma 2:
softmax(c·tanh(s·q·kᵀ / c) + mask)·v → softcap = c), and Gemma 2's final logit soft-capping is written after the
head, as are the scalings outside the blocks (Granite's embedding_multiplier and 1 / logits_scaling, Cohere's
logit_scale). Dynamic NTK rope scaling (InternLM3) changes the tables only for sequences longer than
max_position_embeddings, the export's max_length: its tables are the unscaled ones, exact for every sequence the
model runs. Longrope (Phi-3 128k, Phi-3.5, Phi-4-mini) rotates with its short factors while the sequence fits
original_max_position_embeddings and with its long ones past it: both tables are written, one after the other, and
the positions the attention rotates with are shifted into the long half once the total length passes that point —
what transformers does step by step with its cache (tokens already cached keep the rotation they had), and what
onnxruntime-genai's own builder writes. Per-layer-type longrope is refused.
Mixture-of-experts blocks write their routed experts as one com.microsoft::QMoE (moe.py: routing and activation
read off the graph; weight-only int4 / int8 experts); shared experts and routers are ordinary linears. LayerNorm
blocks (StarCoder2, Phi-3.5-MoE) use LayerNormalization.

A quantized KV cache (kv_quant pass, static symmetric int8 / int4 scales) is GroupQueryAttention's own:
k_quant_type / v_quant_type PER_TENSOR or PER_CHANNEL (per-head scales repeated over the head's channels),
kv_cache_bit_width 8 (int8 cache) or 4 (two codes per uint8, low nibble first), k_scale / v_scale inputs, so the
past/present cache tensors are int8 [B, H_kv, T, D] or uint8 [B, H_kv, T, D/2]; onnxruntime's CPU kernel
quantizes new keys/values with q = clamp(round(x / s), −2^(b−1), 2^(b−1) − 1), exactly qc::fake_quant_kv.

The lm_head is written as MatMulNBits when the quantize_head pass quantized it (the onnxruntime target adds it by
default, `lm_head_bits`: symmetric blocks of 32, as the onnxruntime-genai builder does for its int4 models), else
float; a float head tied to the embeddings
reads the embedding initializer through Gemm(transB=1) instead of storing a transposed copy.
"""

from __future__ import annotations

import inspect
import json
import math
import operator
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from onnx import TensorProto
from torch import fx

from qcompiler.errors import ExportError
from qcompiler.export.artifact import SavedExporter
from qcompiler.export.onnx.builder import MODEL_FILE, MS_DOMAIN, OnnxBuilder
from qcompiler.export.onnx.emit import (
    W8A8,
    WOQ,
    EmitOptions,
    GraphEmitter,
    matmulnbits_initializers,
    matmulnbits_node,
    matmulnbits_tensors,
    skip_rms_norm,
)
from qcompiler.export.onnx.moe import emit_qmoe, find_moe_regions
from qcompiler.ir import qmeta
from qcompiler.ir.graph import LINEAR, PASSTHROUGH, SDPA_OPS, aten, get_tensor, is_call, skip_passthrough
from qcompiler.ir.records import HEAD_GRID, HeadGrid, KVRecord, LayerRecord
from qcompiler.kernels.packing import store_weight_codes

SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma3_text", "phi3", "smollm3", "exaone4",
                           "glm", "glm4", "olmo2", "gemma2", "granite", "starcoder2", "ernie4_5", "cohere", "mixtral",
                           "qwen2_moe", "qwen3_moe", "phimoe", "granitemoe", "gpt_oss", "hunyuan_v1_dense",
                           "hunyuan_v1_moe", "gpt_neox", "falcon", "glm4_moe", "ernie4_5_moe", "minimax_m2", "internlm3", "hy_v3",
                           "ministral3", "olmo3", "phi", "cohere2")
LINEAR_LIKE = {LINEAR, WOQ, W8A8}
# ops allowed between a projection and attention: head reshapes, rotary arithmetic, GQA repetition
_ATTN_PLUMBING = PASSTHROUGH | {
    aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.transpose.int, aten.unsqueeze.default,
    aten.expand.default, aten.slice.Tensor, aten.neg.default, aten.cat.default, aten.mul.Tensor, aten.add.Tensor,
    aten.sym_size.int, aten.contiguous.default, aten.permute.default,
    # interleaved rotary (GLM): cos/sin repeated pairwise, rotate_half as stack(−x₂, x₁).flatten
    aten.repeat_interleave.self_int, aten.stack.default, aten.flatten.using_ints,
    # rotation by halves (gpt-oss): x₁·cos − x₂·sin, x₂·cos + x₁·sin of chunk(x, 2)
    aten.chunk.default, operator.getitem, aten.sub.Tensor,
    # a quantized KV cache: GroupQueryAttention quantizes the new keys / values itself (k_scale, v_scale)
    torch.ops.qc.fake_quant_kv.default,
}


def _is_linear_like(n: fx.Node) -> bool:
    return is_call(n, LINEAR_LIKE)


def _is_split_projection(n: fx.Node) -> bool:
    """getitem(split_with_sizes(fused projection), i)."""
    if not is_call(n, operator.getitem):
        return False
    split = n.args[0]
    return (isinstance(split, fx.Node) and is_call(split, aten.split_with_sizes.default)
            and isinstance(split.args[0], fx.Node) and _is_linear_like(split.args[0]))


def _projection(node: fx.Node, what: str, block: str, head_norms: set[fx.Node] = frozenset()  # type: ignore[assignment]
                ) -> tuple[fx.Node, set[fx.Node]]:
    """The projection (linear-like node, or getitem of a split fused projection) feeding `node`, or the per-head
    RMSNorm of its heads (`head_norms`: Qwen3's q/k norms, applied to [B, S, H, D] before the rotary embedding),
    and the placeholders read on the way (rotary tables)."""
    sources: set[fx.Node] = set()
    placeholders: set[fx.Node] = set()
    stack, seen = [node], set()
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if _is_linear_like(n) or _is_split_projection(n) or n in head_norms:
            sources.add(n)
            continue
        if n.op == "placeholder":
            placeholders.add(n)
            continue
        if n.op == "get_attr" or is_call(n, aten.sym_size.int):  # (a size read off an input is not its values)
            continue
        if not is_call(n, _ATTN_PLUMBING):
            raise ExportError(
                f"{block}: the {what} path into attention contains '{n.target}' (node '{n.name}'); the ONNX Runtime "
                "decoder export supports projections followed by head reshapes, per-head RMSNorms and rotary "
                "embedding only"
            )
        # (a cast's or type_as's other argument only names a dtype: not a path of values)
        stack.extend([n.args[0]] if is_call(n, PASSTHROUGH) and isinstance(n.args[0], fx.Node) else n.all_input_nodes)
    if len(sources) != 1:
        raise ExportError(f"{block}: the {what} input of attention comes from {len(sources)} projections ({sorted(s.name for s in sources)}), expected 1")
    return sources.pop(), placeholders


def _rms_norm_gain(norm: torch.nn.Module, hidden: int, eps: float) -> torch.Tensor:
    """The per-channel gain γ of an RMSNorm module, read off its output rather than its parameter (Llama's norm
    multiplies by w, Gemma's by 1 + w): a row of ones has mean square 1, so norm(1) = γ / √(1 + ε)."""
    with torch.no_grad():
        out = norm(torch.ones(1, hidden, dtype=torch.float32))
    return (out.reshape(-1).double() * math.sqrt(1.0 + eps)).float()


def _from_placeholder(node: fx.Node) -> bool:
    """The node is a block input, possibly sliced or cast (HF passes the model's mask in)."""
    while node.op == "call_function" and node.args and isinstance(node.args[0], fx.Node):
        node = node.args[0]
    return node.op == "placeholder"


@dataclass
class _Attention:
    """One attention of a block: its q, k, v inputs ([B, H, S, D] after rotary / GQA repetition), mask, scale, logit
    soft-capping (None: none) and the node whose output is the attention's [B, H, S, D] result."""

    q: fx.Node
    k: fx.Node
    v: fx.Node
    mask: Any
    scale: float | None
    softcap: float | None
    out: fx.Node
    sinks: fx.Node | None = None  # gpt-oss: per-head logits joining the softmax's denominator (get_attr)


def _constant_factor(n: fx.Node, op: Any) -> tuple[fx.Node, float] | None:
    """(x, c) for op(x, c) with a Python-number c."""
    if is_call(n, op) and isinstance(n.args[0], fx.Node) and isinstance(n.args[1], int | float):
        return n.args[0], float(n.args[1])
    return None


def _find_attention(gm: fx.GraphModule, block: str) -> _Attention:
    """The block's one attention: scaled_dot_product_attention, or the eager form transformers runs where SDPA
    cannot express the model (Gemma 2's logit soft-capping):
        p = softmax(c·tanh(s·(q·kᵀ)/c) + mask)  (soft-capping optional),  out = p·v"""
    sdpas = [n for n in gm.graph.nodes if is_call(n, SDPA_OPS)]
    if len(sdpas) == 1:
        sdpa = sdpas[0]
        return _Attention(sdpa.args[0], sdpa.args[1], sdpa.args[2],  # type: ignore[arg-type]
                          sdpa.args[3] if len(sdpa.args) > 3 else sdpa.kwargs.get("attn_mask"),
                          sdpa.kwargs.get("scale"), None, sdpa)
    softmaxes = [n for n in gm.graph.nodes if is_call(n, (aten.softmax.int, aten._softmax.default))
                 and len(n.meta["val"].shape) == 4]  # (over [B, H, S, T] scores: not an MoE router's)
    if sdpas or len(softmaxes) != 1:
        raise ExportError(f"{block}: expected one attention (scaled_dot_product_attention or one softmax), found "
                          f"{len(sdpas)} and {len(softmaxes)} softmax")
    softmax = softmaxes[0]
    x, mask = skip_passthrough(softmax.args[0]), None  # type: ignore[arg-type]
    # attention sinks (gpt-oss): softmax(cat([scores, sinks]) − max)[..., :−1], i.e. exp(sink) joins the denominator
    sinks = None
    if is_call(x, aten.sub.Tensor) and is_call(x.args[1], operator.getitem) \
            and is_call(x.args[1].args[0], aten.max.dim) and x.args[1].args[0].args[0] is x.args[0]:  # type: ignore[union-attr]
        # (subtracting the row maximum leaves a softmax unchanged)
        x = x.args[0]  # type: ignore[assignment]
    if is_call(x, aten.cat.default) and len(x.args[0]) == 2 and x.args[1] in (-1, 3):  # type: ignore[arg-type]
        scores, column = x.args[0]  # type: ignore[misc,str-unpack]
        while is_call(column, (aten.expand.default, aten.reshape.default, aten.view.default)):
            column = column.args[0]
        if not (isinstance(column, fx.Node) and column.op == "get_attr"):
            raise ExportError(f"{block}: the attention softmax reads a column '{column}' that is not per-head sinks")
        x, sinks = skip_passthrough(scores), column  # type: ignore[arg-type]
    if is_call(x, aten.add.Tensor) and all(isinstance(a, fx.Node) for a in x.args[:2]):
        x, mask = x.args[0], x.args[1]
    softcap = None
    capped = _constant_factor(x, aten.mul.Tensor)  # type: ignore[arg-type]
    if capped is not None and is_call(capped[0], aten.tanh.default):
        inner = _constant_factor(capped[0].args[0], aten.div.Tensor)  # type: ignore[arg-type]
        if inner is None or inner[1] != capped[1]:
            raise ExportError(f"{block}: attention scores pass a tanh that is not c·tanh(x / c) soft-capping")
        x, softcap = inner[0], capped[1]
    scale = 1.0
    scaled = _constant_factor(x, aten.mul.Tensor)  # type: ignore[arg-type]
    divided = _constant_factor(x, (aten.div.Tensor, aten.div_.Tensor))  # type: ignore[arg-type]  # (Falcon: s /= √d)
    if scaled is not None:
        x, scale = scaled
    elif divided is not None:
        x, scale = divided[0], 1.0 / divided[1]
    if not (is_call(x, aten.matmul.default) and is_call(x.args[1], aten.transpose.int)  # type: ignore[union-attr]
            and sorted(int(d) % 4 for d in x.args[1].args[1:3]) == [2, 3]):  # type: ignore[union-attr]
        raise ExportError(f"{block}: the softmax '{softmax.name}' does not read q·kᵀ attention scores")
    q, k = x.args[0], x.args[1].args[0]  # type: ignore[union-attr]
    out = softmax  # (through casts and an eval-mode dropout; with sinks, the slice dropping the sink column)
    if sinks is not None:
        drop = next(iter(out.users)) if len(out.users) == 1 else None
        if not (is_call(drop, aten.slice.Tensor) and drop.args[1] in (-1, 3) and drop.args[2] == 0  # type: ignore[union-attr]
                and drop.args[3] == -1):  # type: ignore[union-attr]
            raise ExportError(f"{block}: the attention probabilities '{softmax.name}' keep the sink column")
        out = drop  # type: ignore[assignment]
    while len(out.users) == 1 and is_call(next(iter(out.users)), PASSTHROUGH | {aten.dropout.default}):
        out = next(iter(out.users))
    users = list(out.users)
    if len(users) != 1 or not is_call(users[0], aten.matmul.default) or users[0].args[0] is not out:
        raise ExportError(f"{block}: the attention probabilities '{softmax.name}' do not multiply the values")
    return _Attention(q, k, users[0].args[1], mask, scale, softcap, users[0], sinks)  # type: ignore[arg-type]


def _attention_output(sdpa: fx.Node, block: str) -> fx.Node:
    """The attention's output as [B, S, heads·head size]: the node after the transpose/reshape plumbing, which o_proj
    reads directly or through QuaRot's online Hadamard (emitted by its own rule after the op)."""
    n = sdpa
    while True:
        users = list(n.users)
        if len(users) != 1:
            raise ExportError(f"{block}: attention output '{n.name}' has {len(users)} users; expected a chain to o_proj")
        u = users[0]
        if _is_linear_like(u) or (is_call(u, torch.ops.qc.hadamard_transform.default) and len(u.users) == 1
                                  and _is_linear_like(next(iter(u.users)))):
            return n
        if not is_call(u, _ATTN_PLUMBING):
            raise ExportError(f"{block}: unexpected op '{u.target}' between attention and o_proj (node '{u.name}')")
        n = u


def _decoder_body(model: torch.nn.Module) -> Any:
    """The causal LM's inner model (embeddings, rotary module, blocks, final norm)."""
    return model.get_decoder() if hasattr(model, "get_decoder") else model.model


def _rotary_module(model: torch.nn.Module) -> torch.nn.Module | None:
    """The module computing the rotary tables the blocks take (`rotary_emb` of the decoder body)."""
    for owner in (_decoder_body(model), getattr(model, "model", None)):
        if isinstance(getattr(owner, "rotary_emb", None), torch.nn.Module):
            return owner.rotary_emb  # type: ignore[union-attr]
    return None


def _final_norm_module(body: torch.nn.Module) -> torch.nn.Module:
    """The decoder's final norm (`norm`; GPT-NeoX: `final_layer_norm`; Phi-2: `final_layernorm`; Falcon: `ln_f`)."""
    for attr in ("norm", "final_layer_norm", "final_layernorm", "ln_f"):
        if isinstance(getattr(body, attr, None), torch.nn.Module):
            return getattr(body, attr)
    raise ExportError(f"{type(body).__name__}: no final norm module (norm, final_layer_norm, final_layernorm or ln_f) to export")


def _kv_heads(cfg: Any) -> int:
    """Key/value heads of the attention (the cache's heads). Falcon names them num_kv_heads, and its original
    architecture (falcon-7b) has one shared head under multi_query, else one per query head."""
    heads = int(cfg.num_attention_heads)
    if cfg.model_type == "falcon" and not getattr(cfg, "new_decoder_architecture", False):
        return 1 if cfg.multi_query else heads
    return int(getattr(cfg, "num_key_value_heads", None) or getattr(cfg, "num_kv_heads", None) or heads)


def _routed_experts(cfg: Any) -> int:
    """The number of routed experts of an MoE config (0: a dense model)."""
    return max(int(getattr(cfg, f, None) or 0) for f in ("num_local_experts", "num_experts", "n_routed_experts",
                                                          "moe_num_experts"))


def _rope_parameters(cfg: Any) -> dict[str, Any]:
    """The config's rotary parameters (transformers 5's rope_parameters, or an older config's rope_scaling)."""
    return getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}


def _longrope_start(cfg: Any) -> int | None:
    """For a model-wide longrope, the length past which its long factors rotate (0 when the config does not say);
    None for any other rotation."""
    rope = _rope_parameters(cfg)
    if rope.get("rope_type", rope.get("type")) != "longrope":
        return None
    return int(rope.get("original_max_position_embeddings") or getattr(cfg, "original_max_position_embeddings", 0) or 0)


def check_decoder_config(cfg: Any, scheme: Any = None) -> None:
    """Refuse an architecture, shape or scheme the decoder export cannot express, naming the fix."""
    arch = cfg.model_type
    if scheme is not None and _routed_experts(cfg) and (
            scheme.activations is not None or scheme.weights is None or scheme.sparsity is not None):
        raise ExportError(f"onnxruntime's QMoE runs weight-only int4 / int8 experts, not the experts of scheme "
                          f"'{scheme.name}'; use w4a16 or w8a16 for --target onnxruntime, or --target reference")
    if arch not in SUPPORTED_ARCHITECTURES:
        # (the architectures it builds are the matrix's O column, `qcompile schemes --families`; not listed here,
        # so that this reason stays one line and does not change with every architecture added)
        raise ExportError(f"the ONNX Runtime decoder export has no decoder for '{arch}' models (the support matrix, "
                          "`qcompile schemes --families`, shows which it builds); use --target reference for this model")
    rope = _rope_parameters(cfg)
    per_layer_type = all(isinstance(r, dict) for r in rope.values())  # (Gemma 3: parameters by layer type)
    rope_types = {str(r.get("rope_type", r.get("type"))) for r in (rope.values() if per_layer_type else [rope])}
    # (dynamic NTK scaling changes the tables only past max_position_embeddings, which genai's max_length stops at;
    # longrope's switch is written into the graph: module docstring)
    if "longrope" in rope_types and per_layer_type:
        raise ExportError("the ONNX Runtime decoder export switches one longrope table pair by the sequence length, "
                          "not one per layer type; use --target reference for this model")
    if _longrope_start(cfg) == 0:
        raise ExportError("longrope scaling without original_max_position_embeddings (where its long factors start) "
                          "in config.json; use --target reference for this model")
    heads = int(cfg.num_attention_heads)
    head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // heads)
    if head_dim % 16:
        raise ExportError(f"onnxruntime's GroupQueryAttention needs a head size divisible by 16, this model has "
                          f"{head_dim}; use --target reference for it")


class DecoderExporter:
    """Streams a decoder-only LM into MODEL_FILE in `out_dir` while the driver lowers its blocks."""

    # what changes as blocks are emitted (names of ONNX values, progress), saved after every block for --resume;
    # the rest is derived again from the model and the options
    _PROGRESS: dict[str, type | tuple[type, ...]] = {
        "kv_bits": (int, type(None)), "seqlens_k": str, "total_len": str, "rotary": dict, "hidden": str,
        "residual": (list, type(None)), "blocks_done": int, "tied": bool, "interleaved_tables": bool,
        "embedding_name": (str, type(None)), "head_block": (int, type(None)), "head_shape": (list, type(None)),
        "head_weights": (list, type(None)), "positions": (str, type(None)), "rope_positions": (str, type(None)),
    }

    def __init__(self, out_dir: Path, model: torch.nn.Module, options: EmitOptions | None = None,
                 saved: SavedExporter | None = None):
        cfg = model.config
        self.cfg = cfg
        self._model = model  # (its rotary module makes the tables of blocks that rotate in the graph)
        self._tables: dict[str, tuple[torch.Tensor, torch.Tensor, str]] = {}  # by layer type, computed once
        check_decoder_config(cfg)
        # longrope: the length past which the long factors rotate (module docstring); None for other rotations
        self.longrope_from = _longrope_start(cfg)
        self.options = options or EmitOptions()
        # a head the quantize_head pass quantized is written as MatMulNBits with its grid; otherwise float
        grid = getattr(model.get_output_embeddings(), HEAD_GRID, None)
        self.lm_head_bits = None if grid is None else int(grid.args.bits)
        self.out_dir = Path(out_dir)
        self.heads = int(cfg.num_attention_heads)
        self.kv_heads = _kv_heads(cfg)
        self.head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // self.heads)
        self.layers = int(cfg.num_hidden_layers)
        self.vocab = int(cfg.vocab_size)
        # set as the lm_head / embedding are emitted (a quantized head: its block size, [N, K] and initializers)
        self.embedding_name: Any = None
        self.head_block: Any = None
        self.head_shape: Any = None
        self.head_weights: Any = None
        if saved is not None:
            self.b = OnnxBuilder.restore(self.out_dir / MODEL_FILE, saved)
            for key, kind in self._PROGRESS.items():
                setattr(self, key, saved.get(key, kind))
            return
        b = self.b = OnnxBuilder(self.out_dir / MODEL_FILE)
        ids = b.add_input("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"])
        mask = b.add_input("attention_mask", TensorProto.INT64, ["batch_size", "total_sequence_length"])
        self.kv_bits: int | None = None  # the quantized cache's bits (None: float), from the first block
        one = b.const([1], np.int64)
        total = b.op("ReduceSum", [mask, one], "/mask/reduce_sum", keepdims=0)
        self.seqlens_k = b.op("Cast", [b.op("Sub", [total, one], "/mask/sub")], "/mask/seqlens_k", to=TensorProto.INT32)
        t = b.op("Gather", [b.op("Shape", [mask], "/mask/shape"), b.const(1, np.int64)], "/mask/total", axis=0)
        self.total_len = b.op("Cast", [t], "/mask/total_i32", to=TensorProto.INT32)
        # cos/sin caches by layer type (Gemma 3's sliding layers rotate with another base than its full ones)
        self.interleaved_tables = False
        # per layer type: whether GroupQueryAttention can rotate with the model's tables (written on first use)
        self.rotary = {t: self._rotary_caches(model, t) is not None for t in dict.fromkeys(self._layer_types())}
        self.positions: str | None = None  # each token's position [B, S], made when a block first needs it
        self.rope_positions: str | None = None  # (longrope: the table rows they rotate with)
        self.hidden = self._embedding(ids, model)
        # the previous block's final residual add (a, b), left for the next norm to fuse (SkipSimplifiedLayerNorm)
        self.residual: tuple[str, str] | None = None
        self.blocks_done = 0

    def save_state(self, folder: Path, tag: str) -> dict[str, Any]:
        # (tuples come back as lists, which every use of these fields accepts)
        return {**{key: getattr(self, key) for key in self._PROGRESS}, **self.b.save_state(folder, tag)}

    def _layer_types(self) -> list[str]:
        """Each layer's attention type ("full_attention", "sliding_attention"); one type where the config has none."""
        types = getattr(self.cfg, "layer_types", None)
        return list(types) if types else ["full_attention"] * self.layers

    def _window(self, index: int) -> int:
        """GroupQueryAttention's local_window_size for layer `index`: the sliding window on a sliding layer (Gemma 3's
        pattern, or every layer where the config has a window and no types), −1 (none) on a full one."""
        cfg = self.cfg
        if getattr(cfg, "layer_types", None):
            return int(cfg.sliding_window) if self._layer_types()[index] == "sliding_attention" else -1
        return int(cfg.sliding_window) if getattr(cfg, "sliding_window", None) and getattr(
            cfg, "use_sliding_window", True) else -1

    def _model_rotary_tables(self, model: torch.nn.Module, layer_type: str) -> tuple[torch.Tensor, torch.Tensor, str]:
        """cos and sin [max_positions, rotary dims] as the model's rotary module computes them for every position
        (attention scaling included), and the suffix naming this layer type's tables."""
        if layer_type in self._tables:
            return self._tables[layer_type]
        rotary = _rotary_module(model)
        if rotary is None:
            raise ExportError(f"{type(model).__name__} has no rotary module (rotary_emb) whose tables the ONNX Runtime "
                              "decoder export could rotate with; use --target reference for this model")
        pos = torch.arange(int(self.cfg.max_position_embeddings))[None]
        per_type = "layer_type" in inspect.signature(rotary.forward).parameters
        with torch.no_grad():
            x = torch.zeros(1, dtype=torch.float32)
            tables = rotary(x, pos, layer_type) if per_type else rotary(x, pos)
            if self.longrope_from is not None and isinstance(tables, tuple | list) and len(tables) == 2:
                # rows [0, P): the short factors (what a sequence within original_max_position_embeddings rotates
                # with; rows past it are never read so, they repeat the long ones), rows [P, 2P): the long factors
                short = rotary(x, pos[:, :self.longrope_from])
                tables = tuple(torch.cat([s, t[:, s.shape[1]:], t], dim=1) for s, t in zip(short, tables, strict=True))
        if not (isinstance(tables, tuple | list) and len(tables) == 2):  # (DeepSeek V2, Llama 4: one complex tensor)
            raise ExportError(f"{type(rotary).__name__} returns {type(tables).__name__}, not the (cos, sin) tables the "
                              "ONNX Runtime decoder export rotates with; use --target reference for this model")
        cos, sin = tables
        self._tables[layer_type] = (cos[0].float(), sin[0].float(),
                                    f"_{layer_type.removesuffix('_attention')}" if per_type else "")
        return self._tables[layer_type]

    def _rotary_caches(self, model: torch.nn.Module, layer_type: str) -> tuple[torch.Tensor, torch.Tensor, str] | None:
        """GroupQueryAttention's cos/sin caches [max_positions, rotary dims / 2] for this layer type and their names'
        suffix, or None where the op cannot rotate these heads (a part of a head that is not a multiple of 16 dims, a
        table layout it does not take): such blocks rotate in the graph (`_rotated_attention_inputs`)."""
        try:
            cos, sin, suffix = self._model_rotary_tables(model, layer_type)
        except ExportError:  # (no rotary module, or not (cos, sin) tables: the blocks' own graphs say whether they
            # rotate at all)
            return None
        rotary_dim = int(cos.shape[-1])  # (< head_dim: partial rotary, GLM's half; the rest passes through)
        if rotary_dim > self.head_dim or rotary_dim % 2:
            raise ExportError(f"a rotary embedding of {rotary_dim} dims does not fit heads of {self.head_dim}")
        half = rotary_dim // 2
        if torch.allclose(cos[:, :half], cos[:, half:]):  # rotate-half tables: cat(f, f)
            cos, sin = cos[:, :half], sin[:, :half]
        elif torch.allclose(cos[:, 0::2], cos[:, 1::2]):  # interleaved tables (Cohere): f₀ f₀ f₁ f₁ …
            cos, sin = cos[:, 0::2], sin[:, 0::2]
            self.interleaved_tables = True
        elif 2 * rotary_dim == self.head_dim:  # one table per frequency, the whole head rotated by halves (gpt-oss)
            rotary_dim, half = self.head_dim, rotary_dim
        else:
            return None
        if rotary_dim < self.head_dim and half % 8:  # (onnxruntime rotates part of a head in multiples of 16 dims)
            return None
        return cos.contiguous(), sin.contiguous(), suffix

    def _gqa_tables(self, layer_type: str) -> list[str]:
        """The initializers of `_rotary_caches`, written once, when the first block rotates in the op."""
        cos, sin, suffix = self._rotary_caches(self._model, layer_type)  # type: ignore[misc]
        return [self.b.shared_initializer(f"cos_cache{suffix}", lambda: cos),
                self.b.shared_initializer(f"sin_cache{suffix}", lambda: sin)]

    def add_block(self, index: int, name: str, gm: fx.GraphModule, layers: Mapping[str, LayerRecord],
                  kv: Sequence[KVRecord]) -> None:
        # (the decoder is emitted from the lowered graph itself; the records say nothing it does not see)
        if index != self.blocks_done:
            raise ExportError(f"blocks must be exported in order: got {index}, expected {self.blocks_done}")
        em = GraphEmitter(self.b, gm, f"/model/layers.{index}", self.options)
        hidden = next(n for n in gm.graph.nodes if n.op == "placeholder")
        self._bind_hidden(em, gm, hidden)
        att = _find_attention(gm, name)
        mask = att.mask
        if mask is not None and not (isinstance(mask, fx.Node) and _from_placeholder(mask)):
            raise ExportError(f"{name}: attention with a mask computed inside the block is not supported")
        # a mask coming from the model (causal, sliding window, padding) is what GroupQueryAttention builds
        # itself from seqlens_k, the total length and local_window_size
        kv_fq = {n.meta[qmeta.KV_FQ]["kind"]: n for n in gm.graph.nodes if qmeta.KV_FQ in n.meta}
        kv_inputs, kv_attrs = self._kv_quantization(gm, kv_fq, index, name)
        layer_type = self._layer_types()[index]
        try:
            query, key, value, rotary, interleaved = self._rotating_attention_inputs(em, gm, att, name,
                                                                                     self.rotary[layer_type])
        except ExportError as refusal:  # q/k paths GroupQueryAttention cannot rotate itself: the graph rotates them
            query, key, value = self._rotated_attention_inputs(em, gm, att, name, index, str(refusal))
            rotary = interleaved = False
        scale = att.scale or 1.0 / math.sqrt(self.head_dim)
        softcap = {"softcap": float(att.softcap)} if att.softcap else {}
        attn = self.b.node(
            "GroupQueryAttention",
            [query, key, value, f"past_key_values.{index}.key", f"past_key_values.{index}.value", self.seqlens_k,
             self.total_len, *(self._gqa_tables(layer_type) if rotary else ("", "")),
             *self._extra_inputs(kv_inputs, att, em, index, rotary)],
            f"/model/layers.{index}/attn/GroupQueryAttention", domain=MS_DOMAIN,
            outputs=[self.b.fresh(f"/model/layers.{index}/attn/output"), f"present.{index}.key", f"present.{index}.value"],
            num_heads=self.heads, kv_num_heads=self.kv_heads, scale=float(scale), do_rotary=int(rotary), rotary_interleaved=int(interleaved),
            local_window_size=self._window(index), **softcap, **kv_attrs,
        )
        em.env[_attention_output(att.out, name)] = attn[0]
        # (after the attention is bound: the experts' input is computed from its output)
        for region in find_moe_regions(gm, self.cfg, name):
            em.env[region.out] = emit_qmoe(em, region, index)
        out = next(n for n in gm.graph.nodes if n.op == "output")
        result = out.args[0][0] if isinstance(out.args[0], tuple | list) else out.args[0]
        if is_call(result, aten.add.Tensor) and all(isinstance(a, fx.Node) for a in result.args[:2]):
            # the block ends with its residual add: leave it to the next norm (SkipSimplifiedLayerNormalization)
            self.residual = tuple(em.emit(list(result.args[:2])))  # type: ignore[assignment]
        else:
            (self.hidden,) = em.emit([result])  # type: ignore[assignment]
        self.blocks_done += 1

    def _rotating_attention_inputs(self, em: GraphEmitter, gm: fx.GraphModule, att: _Attention, name: str,
                                   tables: bool) -> tuple[str, str, str, bool, bool]:
        """GroupQueryAttention's query, key, value inputs ([B, S, ·] before rotary; key and value empty where the
        query is the packed q|k|v), whether it rotates them and in which layout, where the q/k paths are the
        projections, reshapes, per-head norms and rotary arithmetic the op computes itself; ExportError otherwise."""
        # per-head q/k RMSNorms (Qwen3) run before GroupQueryAttention, on [B, S, H, D], then back to [B, S, H·D]
        head_norms = {n for n in gm.graph.nodes if is_call(n, aten.mul.Tensor) and em.norm(n) is not None
                      and len(n.meta["val"].shape) == 4}
        # RMSNorms over a whole projection's output, before the head split (OLMo 2's q/k norms): emitted as they are
        width_norms = {n for n in gm.graph.nodes if is_call(n, aten.mul.Tensor) and em.norm(n) is not None
                       and len(n.meta["val"].shape) == 3 and self._reads_projection(em.norm(n)[0])}  # type: ignore[index]
        head_norms |= width_norms
        (q, q_ph), (k, k_ph), (v, _) = (_projection(x, w, name, head_norms)
                                        for x, w in zip((att.q, att.k, att.v), ("query", "key", "value"), strict=True))
        if bool(q_ph) != bool(k_ph):
            raise ExportError(f"{name}: a rotary embedding on the {'query' if q_ph else 'key'} path only; "
                              "GroupQueryAttention rotates both or neither")
        rotary = bool(q_ph)  # (none: a NoPE layer, SmolLM3's every 4th, EXAONE 4's global ones)
        # pairs (x₂ᵢ, x₂ᵢ₊₁) rotate together where the block repeats cos/sin pairwise and rotates by stack/flatten (GLM)
        # (or where the model's rotary module builds interleaved tables itself: Cohere)
        interleaved = self.interleaved_tables or any(is_call(n, aten.repeat_interleave.self_int) for n in gm.graph.nodes)
        if interleaved != any(is_call(n, aten.stack.default) for n in gm.graph.nodes):
            raise ExportError(f"{name}: the rotary embedding mixes the interleaved and the rotate-half layouts")
        if rotary and not tables:
            raise ExportError(f"{name}: GroupQueryAttention cannot take this model's rotary tables (a part of a head "
                              "that is not a multiple of 16 dims, or a layout it does not rotate)")
        qkv_split = [x.args[0] if is_call(x, operator.getitem) else None for x in (q, k, v)]
        if (qkv_split[0] is not None and qkv_split[0] is qkv_split[1] is qkv_split[2]
                and [x.args[1] for x in (q, k, v)] == [0, 1, 2] and len(qkv_split[0].args[1]) == 3):  # type: ignore[arg-type]
            # (a projection fused with more than q, k, v — Cohere's parallel block fuses gate and up in — is split)
            packed = qkv_split[0].args[0]  # the fused q|k|v projection, in q, k, v order
            query, key, value = em.v(packed), "", ""
        elif q is k is v:  # one fused projection sliced into q, k, v (Phi-3's qkv_proj)
            self._check_packed_slices(q, [att.q, att.k, att.v], name)
            query, key, value = em.v(q), "", ""
        else:
            query, key, value = (em.v(x) if x in width_norms or x not in head_norms else self._head_norm(em, x)
                                 for x in (q, k, v))
        return query, key, value, rotary, interleaved

    def _rotated_attention_inputs(self, em: GraphEmitter, gm: fx.GraphModule, att: _Attention, name: str, index: int,
                                  refusal: str) -> tuple[str, str, str]:
        """GroupQueryAttention's query, key, value inputs [B, S, H·D] computed by the block's own graph, rotary
        included (do_rotary=0): for q/k paths the op cannot rotate itself — a norm after the rotary embedding
        (HunYuan), a partial rotation of fewer than 16 dims (GPT-NeoX), heads interleaved in a fused projection. The
        cache then holds rotated keys, as the model's own cache does. The block's cos / sin inputs [B, S, R] are the
        model's rotary tables [max_positions, R] gathered at each token's position (`_positions`); which input is
        sin is read off the graph: the one multiplying the rotate-half term (a path through neg)."""
        ph_reads: dict[fx.Node, set[fx.Node]] = {}  # rotary placeholder -> the muls it scales
        for start in (att.q, att.k):
            stack, seen = [start], set()
            while stack:
                n = stack.pop()
                if n in seen or _is_linear_like(n) or n.op == "get_attr" or is_call(n, aten.sym_size.int):
                    continue  # (a size read off an input, the mask's, is not its values)
                seen.add(n)
                if n.op == "placeholder":
                    ph_reads.setdefault(n, set())
                    continue
                stack.extend(n.all_input_nodes)
        if ph_reads:
            cos, sin, suffix = self._model_rotary_tables(self._model, self._layer_types()[index])
        is_sin: list[bool] = []
        for ph in ph_reads:
            shape = ph.meta["val"].shape
            if len(shape) != 3 or int(shape[-1]) != int(cos.shape[-1]):
                raise ExportError(f"{name}: the query/key paths read block input '{ph.name}' {list(shape)}, which is "
                                  f"not the model's rotary table [batch, seq, {int(cos.shape[-1])}] ({refusal})")
            is_sin.append(self._scales_rotated_half(ph))
            kind = "sin" if is_sin[-1] else "cos"
            values = (sin if kind == "sin" else cos).contiguous()
            table = self.b.shared_initializer(f"{kind}_table{suffix}", lambda values=values: values)  # type: ignore[misc]
            em.env[ph] = self.b.op("Gather", [table, self._rope_positions()], f"{em.scope}/{ph.name}_{kind}", axis=0)
        if ph_reads and sorted(is_sin) != [False, True]:
            raise ExportError(f"{name}: the query/key paths read {len(ph_reads)} block inputs, not one cosine and one "
                              f"sine table ({refusal})")
        inputs = []
        for x, heads in ((att.q, self.heads), (att.k, self.kv_heads), (att.v, self.kv_heads)):
            x = self._unrepeated(x, heads, name)
            try:
                y = em.v(x)
            except ExportError as e:
                raise ExportError(f"{e} ({refusal})") from e
            merged = self.b.op("Transpose", [y], f"{em.scope}/attn/{x.name}_to_bshd", perm=[0, 2, 1, 3])
            inputs.append(self.b.op("Reshape", [merged, self.b.const([0, 0, -1], np.int64)],
                                    f"{em.scope}/attn/{x.name}_merge_heads"))
        return inputs[0], inputs[1], inputs[2]

    @staticmethod
    def _scales_rotated_half(table: fx.Node) -> bool:
        """Whether a rotary table input multiplies a rotate-half term (sin in x·cos + rotate_half(x)·sin): a
        factor whose values pass a neg on the way from the projection."""
        muls, stack = [], list(table.users)
        while stack:
            n = stack.pop()
            if is_call(n, aten.mul.Tensor):
                muls.append(n)
            elif is_call(n, PASSTHROUGH | {aten.unsqueeze.default, aten.slice.Tensor, aten.view.default,
                                           aten.reshape.default, aten.expand.default}):
                stack.extend(n.users)

        def through_neg(x: Any) -> bool:
            stack, seen = [x], set()
            while stack:
                n = stack.pop()
                if not isinstance(n, fx.Node) or n in seen or n.op != "call_function" or _is_linear_like(n):
                    continue
                seen.add(n)
                if is_call(n, aten.neg.default):
                    return True
                stack.extend(n.all_input_nodes)
            return False

        return any(through_neg(a) for m in muls for a in m.args[:2] if isinstance(a, fx.Node)
                   and not _from_placeholder(a))

    def _unrepeated(self, x: fx.Node, heads: int, name: str) -> fx.Node:
        """The [B, heads, S, D] tensor before GQA's repetition of key/value heads (repeat_kv: unsqueeze, expand,
        reshape) and a quantized cache's fake quantization (GroupQueryAttention repeats and quantizes itself)."""
        n = x

        def whole_slice(n: fx.Node) -> bool:
            return is_call(n, aten.slice.Tensor) and n.meta["val"].shape == n.args[0].meta["val"].shape  # type: ignore[union-attr]

        def identity_to_cache(n: fx.Node) -> bool:  # (a whole-window slice or copy of the quantized cache)
            while whole_slice(n) or is_call(n, {aten.clone.default, aten.contiguous.default}):
                n = n.args[0]  # type: ignore[assignment]
            return is_call(n, torch.ops.qc.fake_quant_kv.default)

        while (len(n.meta["val"].shape) != 4 or int(n.meta["val"].shape[1]) != heads
               or is_call(n, torch.ops.qc.fake_quant_kv.default) or identity_to_cache(n)):
            if not (whole_slice(n) or is_call(n, PASSTHROUGH | {
                    aten.reshape.default, aten.view.default, aten.expand.default, aten.unsqueeze.default,
                    aten.clone.default, aten.contiguous.default, torch.ops.qc.fake_quant_kv.default})):
                raise ExportError(f"{name}: attention input '{x.name}' is not [batch, {heads} heads, seq, "
                                  f"{self.head_dim}] repeated over query heads")
            n = n.args[0]  # type: ignore[assignment]
        shape = n.meta["val"].shape
        if len(shape) != 4 or int(shape[-1]) != self.head_dim:
            raise ExportError(f"{name}: attention input '{n.name}' has shape {list(shape)}, not [batch, {heads}, seq, "
                              f"{self.head_dim}]")
        return n

    def _positions(self) -> str:
        """Each token's position [B, S] (int64), as GroupQueryAttention rotates: s on the first prompt (the cache
        empty: total length = S), else seqlens_k[b] + 1 − S + s (the tokens follow each row's cached ones)."""
        if self.positions is None:
            b = self.b
            seq = b.op("Gather", [b.op("Shape", ["input_ids"], "/positions/shape"), b.const(1, np.int64)],
                       "/positions/seq", axis=0)
            offsets = b.op("Sub", [b.op("Cast", [self.seqlens_k], "/positions/seqlens", to=TensorProto.INT64),
                                   b.op("Sub", [seq, b.const(1, np.int64)], "/positions/seq_minus_1")],
                           "/positions/offsets")
            first = b.op("Equal", [b.op("Cast", [self.total_len], "/positions/total", to=TensorProto.INT64), seq],
                         "/positions/first_prompt")
            start = b.op("Where", [first, b.const(0, np.int64), offsets], "/positions/start")
            steps = b.op("Range", [b.const(0, np.int64), seq, b.const(1, np.int64)], "/positions/range")
            self.positions = b.op("Add", [b.op("Unsqueeze", [start, b.const([1], np.int64)], "/positions/column"),
                                          steps], "/positions")
        return self.positions

    def _rope_positions(self) -> str:
        """The rows of the rotary tables each token rotates with: its position, shifted into the long-factor half
        of a longrope table pair once the total length passes original_max_position_embeddings (module docstring)."""
        if self.longrope_from is None:
            return self._positions()
        if self.rope_positions is None:
            b = self.b
            long = b.op("Greater", [b.op("Cast", [self.total_len], "/rope_positions/total", to=TensorProto.INT64),
                                    b.const(self.longrope_from, np.int64)], "/rope_positions/long")
            shift = b.op("Where", [long, b.const(int(self.cfg.max_position_embeddings), np.int64),
                                   b.const(0, np.int64)], "/rope_positions/shift")
            self.rope_positions = b.op("Add", [self._positions(), shift], "/rope_positions")
        return self.rope_positions

    def _extra_inputs(self, kv_inputs: list[str], att: _Attention, em: GraphEmitter, index: int,
                      rotary: bool) -> list[str]:
        """GroupQueryAttention's inputs after the rotary caches: position_ids (a longrope table pair: the rows to
        rotate with), attention_bias, head_sink (gpt-oss's sinks: softmax with exp(sink) in the denominator), k_scale,
        v_scale (a quantized cache)."""
        extras = list(kv_inputs)  # (from position_ids on: "" where unused)
        if att.sinks is not None:
            sink = self.b.initializer(f"model.layers.{index}.attn.sinks",
                                      em.tensor(att.sinks).detach().float().reshape(-1))
            extras = extras or ["", "", ""]
            extras[2] = sink
        if rotary and self.longrope_from is not None:
            extras = extras or [""]
            extras[0] = self._rope_positions()  # (int64 [B, S])
        return extras

    @staticmethod
    def _reads_projection(x: fx.Node) -> bool:
        x = skip_passthrough(x)
        return _is_linear_like(x) or _is_split_projection(x)

    def _check_packed_slices(self, packed: fx.Node, inputs: list[fx.Node], block: str) -> None:
        """q, k and v are the slices [0, H·D), [H·D, (H + Hkv)·D), [(H + Hkv)·D, (H + 2·Hkv)·D) of one projection's
        last dimension, in that order: GroupQueryAttention's packed-QKV input."""
        q_size, kv_size = self.heads * self.head_dim, self.kv_heads * self.head_dim
        expected = [(0, q_size), (q_size, q_size + kv_size), (q_size + kv_size, q_size + 2 * kv_size)]
        for x, (start, end), what in zip(inputs, expected, ("query", "key", "value"), strict=True):
            cuts, stack, seen = set(), [x], set()
            while stack:  # the nodes that read the fused projection on the way up from this attention input
                n = stack.pop()
                if n in seen or n is packed:
                    continue
                seen.add(n)
                if packed in n.all_input_nodes:
                    cuts.add(n)
                else:
                    stack.extend(n.all_input_nodes)
            cut = cuts.pop() if len(cuts) == 1 else None
            ok = (cut is not None and is_call(cut, aten.slice.Tensor) and cut.args[1] in (-1, 2)  # ([B, S, N])
                  and cut.args[2] == start and min(int(cut.args[3]), q_size + 2 * kv_size) == end)
            if not ok:
                raise ExportError(f"{block}: the {what} is not the slice [{start}, {end}) of the fused projection "
                                  f"'{packed.name}' that GroupQueryAttention's packed input needs")

    def _head_norm(self, em: GraphEmitter, norm: fx.Node) -> str:
        """A per-head RMSNorm as GroupQueryAttention's [B, S, H·D] input: on [B, S, H, D] (Qwen3), or on the heads
        transposed to [B, H, S, D] (Gemma 3), which normalises the same rows of D, so it is computed on
        [B, S, H, D] here and the transpose dropped. The head split is written here (its traced sizes come from
        whichever block input export read them off, the mask among them)."""
        heads = em.norm(norm)[0]  # type: ignore[index]
        chain = []
        while is_call(heads, PASSTHROUGH) or (is_call(heads, aten.transpose.int) and sorted(heads.args[1:3]) == [1, 2]):
            chain.append(heads)
            heads = heads.args[0]  # type: ignore[assignment]
        if not (is_call(heads, (aten.view.default, aten.reshape.default)) and isinstance(heads.args[0], fx.Node)):
            raise ExportError(f"{em.scope}: a per-head norm reads '{heads.name}', not a head split of a projection (a "
                              "q/k norm after the rotary embedding cannot run before GroupQueryAttention, which rotates)")
        split = self.b.op("Reshape", [em.v(heads.args[0]), self.b.const([0, 0, -1, self.head_dim], np.int64)],
                          f"{em.scope}/attn/{heads.name}_split_heads")
        for n in (heads, *chain):
            em.env[n] = split
        return self.b.op("Reshape", [em.v(norm), self.b.const([0, 0, -1], np.int64)],
                         f"{em.scope}/attn/{norm.name}_merge_heads")

    def _kv_quantization(self, gm: fx.GraphModule, kv_fq: dict[str, fx.Node], index: int, name: str
                         ) -> tuple[list[str], dict[str, Any]]:
        """GroupQueryAttention's extra inputs (position_ids … v_scale) and attributes for a quantized cache."""
        bits = None
        if kv_fq:
            if set(kv_fq) != {"k", "v"}:
                raise ExportError(f"{name}: GroupQueryAttention quantizes K and V caches, not {sorted(kv_fq)}")
            args = kv_fq["k"].meta[qmeta.KV_FQ]["args"]
            if args["dynamic"] or not args["symmetric"]:
                raise ExportError(f"{name}: onnxruntime's quantized KV cache takes calibrated symmetric scales, not "
                                  f"{'dynamic' if args['dynamic'] else 'asymmetric'} ones (--kv-cache int8[-tensor|-head])")
            bits = args["bits"]
        if index > 0 and bits != self.kv_bits:
            raise ExportError(f"{name}: every block must quantize its KV cache alike ({self.kv_bits} vs {bits} bits)")
        self.kv_bits = bits
        if bits is None:
            return [], {}
        inputs, attrs = ["", "", ""], {"kv_cache_bit_width": bits}  # (no position_ids, attention_bias, head_sink)
        for kind, attr in (("k", "k_quant_type"), ("v", "v_quant_type")):
            info = kv_fq[kind].meta[qmeta.KV_FQ]
            scale = get_tensor(gm, info["scale"])
            per_tensor = info["args"]["granularity"] == "tensor"
            value = scale.reshape(1) if per_tensor else scale.expand(1, self.kv_heads, 1, self.head_dim).contiguous()
            inputs.append(self.b.initializer(f"model.layers.{index}.attn.{kind}_scale", value.float().contiguous()))
            attrs[attr] = "PER_TENSOR" if per_tensor else "PER_CHANNEL"
        return inputs, attrs

    def _cache_type(self) -> tuple[int, int]:
        """(ONNX element type, last dimension) of the past/present cache tensors."""
        if self.kv_bits == 8:
            return TensorProto.INT8, self.head_dim
        if self.kv_bits == 4:
            return TensorProto.UINT8, self.head_dim // 2
        return TensorProto.FLOAT, self.head_dim

    def _bind_hidden(self, em: GraphEmitter, gm: fx.GraphModule, hidden: fx.Node) -> None:
        """Bind the block's input. A pending residual add of the previous block is fused with this block's
        first norm when that norm reads the input directly; otherwise it is materialised as Add."""
        if self.residual is None:
            em.env[hidden] = self.hidden
            return
        a, b = self.residual
        self.residual = None
        norm = next((n for n in gm.graph.nodes if is_call(n, aten.mul.Tensor) and em.norm(n) is not None
                     and em.norm(n)[0] is hidden), None)  # type: ignore[index]
        if norm is None:
            em.env[hidden] = self.b.op("Add", [a, b], em.scope + "/residual")
        else:
            em.env[norm], em.env[hidden] = skip_rms_norm(em, a, b, norm)

    def _quantized_head(self, grid: HeadGrid) -> None:
        """The head's grid (the quantize_head pass made it) as MatMulNBits tensors, written once, at the start."""
        args = grid.args
        q = store_weight_codes(grid.codes, args.bits, True)
        k = int(grid.codes.shape[1])
        self.head_block, qb, s, _ = matmulnbits_tensors(q, grid.scale, None, args.bits, int(args.group_size or k), k)
        self.head_shape = (int(grid.codes.shape[0]), k)
        self.head_weights = matmulnbits_initializers(self.b, "lm_head", qb, s, None)

    def _embedding(self, ids: str, model: torch.nn.Module) -> str:
        """Embedding lookup; a tied embedding with a quantized head reads the head's integer table
        (com.microsoft::GatherBlockQuantized, same blocks and scales) instead of storing a float copy."""
        b = self.b
        self.embedding = model.get_input_embeddings().weight
        head = model.get_output_embeddings()
        self.tied = head is not None and head.weight is self.embedding
        if self.lm_head_bits is not None:
            self._quantized_head(getattr(head, HEAD_GRID))
            if self.tied:
                n, k = self.head_shape
                kb = -(-k // self.head_block)
                head_b, head_scales, _ = self.head_weights
                data = b.op("Reshape", [head_b, b.const([n, -1], np.int64)], "/model/embed_tokens/data")
                scales = b.op("Reshape", [head_scales, b.const([n, kb], np.int64)], "/model/embed_tokens/scales")
                return self._embed_scale(b.op(
                    "GatherBlockQuantized", [data, ids, scales], "/model/embed_tokens", domain=MS_DOMAIN,
                    bits=self.lm_head_bits, block_size=self.head_block, gather_axis=0, quantize_axis=1), model)
        self.embedding_name = b.initializer("model.embed_tokens.weight", self.embedding.detach().float())
        return self._embed_scale(b.op("Gather", [self.embedding_name, ids], "/model/embed_tokens"), model)

    def _embed_scale(self, x: str, model: torch.nn.Module) -> str:
        """Gemma scales its embeddings by √hidden inside the embedding module (`embed_scale`), Granite by
        `embedding_multiplier` in the model's forward."""
        scale = float(getattr(model.get_input_embeddings(), "embed_scale", None) or 1.0) * float(
            getattr(self.cfg, "embedding_multiplier", None) or 1.0)
        if scale == 1.0:
            return x
        return self.b.op("Mul", [x, self.b.const(np.array(scale, dtype=np.float32))], "/model/embed_tokens/scale")

    def _logit_factor(self) -> float:
        """What the causal LM multiplies its logits by after the head: Granite's 1 / logits_scaling, Cohere's
        logit_scale."""
        return float(getattr(self.cfg, "logit_scale", None) or 1.0) / float(
            getattr(self.cfg, "logits_scaling", None) or 1.0)

    def _lm_head(self, x: str, weight: torch.Tensor, out: str = "logits") -> str:
        b = self.b
        if self.lm_head_bits is not None:
            n, k = self.head_shape
            return matmulnbits_node(b, "/lm_head/MatMulNBits", x, self.head_weights, "", k, n, self.lm_head_bits,
                                    self.head_block, self.options.accuracy_level, output=out)
        w = weight.detach().float()
        if self.tied:  # share the embedding table: Gemm computes x · Eᵀ on 2-D views
            flat = b.op("Reshape", [x, b.const([-1, int(w.shape[1])], np.int64)], "/lm_head/flatten")
            y = b.op("Gemm", [flat, self.embedding_name], "/lm_head/Gemm", transB=1)
            shape = b.op("Concat", [b.op("Slice", [b.op("Shape", [x], "/lm_head/shape"), b.const([0], np.int64),
                                                     b.const([2], np.int64)], "/lm_head/batch_seq"),
                                    b.const([int(w.shape[0])], np.int64)], "/lm_head/out_shape", axis=0)
            return b.node("Reshape", [y, shape], "/lm_head/unflatten", outputs=[out])[0]
        wt = b.initializer("lm_head.weight.T", w.t().contiguous())
        return b.node("MatMul", [x, wt], "/lm_head/MatMul", outputs=[out])[0]

    def _biased_head(self, x: str, weight: torch.Tensor, bias: torch.Tensor | None, out: str = "logits") -> str:
        if bias is None:
            return self._lm_head(x, weight, out)
        z = self._lm_head(x, weight, self.b.fresh("/lm_head/unbiased"))
        bias_name = self.b.initializer("lm_head.bias", bias.detach().float().contiguous())
        return self.b.node("Add", [z, bias_name], "/lm_head/bias", outputs=[out])[0]

    def finish(self, model: torch.nn.Module, metadata: dict[str, str]) -> None:
        if self.blocks_done != self.layers:
            raise ExportError(f"only {self.blocks_done} of {self.layers} blocks were exported")
        b = self.b
        h = self._final_norm(_final_norm_module(_decoder_body(model)))
        cap = getattr(self.cfg, "final_logit_softcapping", None)
        factor = self._logit_factor()
        head = model.get_output_embeddings().weight
        head_bias = getattr(model.get_output_embeddings(), "bias", None)  # (Phi-2's head has one)
        if cap:  # Gemma 2: logits = c·tanh(z / c)
            z = self._biased_head(h, head, head_bias, b.fresh("/lm_head/uncapped"))
            c = b.const(np.array(float(cap), dtype=np.float32))
            t = b.op("Tanh", [b.op("Div", [z, c], "/lm_head/softcap/div")], "/lm_head/softcap/tanh")
            b.node("Mul", [t, c], "/lm_head/softcap/mul", outputs=["logits"])
        elif factor != 1.0:  # Granite, Cohere: logits = z · factor
            z = self._biased_head(h, head, head_bias, b.fresh("/lm_head/unscaled"))
            b.node("Mul", [z, b.const(np.array(factor, dtype=np.float32))], "/lm_head/scale", outputs=["logits"])
        else:
            self._biased_head(h, head, head_bias)
        b.add_output("logits", TensorProto.FLOAT, ["batch_size", "sequence_length", self.vocab])
        elem, last = self._cache_type()
        for i in range(self.layers):
            for kind in ("key", "value"):
                b.add_input(f"past_key_values.{i}.{kind}", elem, ["batch_size", self.kv_heads, "past_sequence_length", last])
                b.add_output(f"present.{i}.{kind}", elem, ["batch_size", self.kv_heads, "total_sequence_length", last])
        b.finish("qcompiler_decoder", metadata)
        (self.out_dir / "genai_config.json").write_text(json.dumps(self.genai_config(), indent=2))

    def _final_norm(self, norm: torch.nn.Module) -> str:
        """The decoder's final norm of the last block's output (its residual add fused where the norm is RMS)."""
        b = self.b
        hidden = int(self.cfg.hidden_size)
        if isinstance(norm, torch.nn.LayerNorm) or type(norm).__name__ in ("CohereLayerNorm", "Cohere2LayerNorm"):
            eps = float(getattr(norm, "eps", getattr(norm, "variance_epsilon", 1e-5)))
            weight = norm.weight if norm.weight is not None else torch.ones(hidden)
            bias = getattr(norm, "bias", None)
            x = b.op("Add", list(self.residual), "/model/norm/residual") if self.residual is not None else self.hidden
            return b.op("LayerNormalization", [x, b.initializer("model.norm.weight", weight.detach().float()),
                                               b.initializer("model.norm.bias", (torch.zeros(hidden) if bias is None
                                                                                 else bias.detach().float()))],
                        "/model/norm", axis=-1, epsilon=eps)
        eps = float(getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6)))
        gamma = b.initializer("model.norm.weight", _rms_norm_gain(norm, hidden, eps))
        if self.residual is not None:
            return b.node("SkipSimplifiedLayerNormalization", [*self.residual, gamma], "/model/norm", domain=MS_DOMAIN,
                          epsilon=eps)[0]
        return b.op("RMSNormalization", [self.hidden, gamma], "/model/norm", axis=-1, epsilon=eps, stash_type=1)

    def abort(self) -> None:
        self.b.abort()

    def genai_config(self) -> dict[str, Any]:
        cfg = self.cfg
        eos = cfg.eos_token_id
        ctx = int(cfg.max_position_embeddings)
        return {
            "model": {
                "bos_token_id": cfg.bos_token_id,
                "context_length": ctx,
                "decoder": {
                    "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                    "filename": MODEL_FILE,
                    "head_size": self.head_dim,
                    "hidden_size": cfg.hidden_size,
                    "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask",
                               "past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value"},
                    "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                                "present_value_names": "present.%d.value"},
                    "num_attention_heads": self.heads,
                    "num_hidden_layers": self.layers,
                    "num_key_value_heads": self.kv_heads,
                },
                "eos_token_id": eos,
                "pad_token_id": cfg.pad_token_id if cfg.pad_token_id is not None else (eos[0] if isinstance(eos, list) else eos),
                "type": cfg.model_type,
                "vocab_size": cfg.vocab_size,
            },
            "search": {
                "diversity_penalty": 0.0, "do_sample": False, "early_stopping": True, "length_penalty": 1.0,
                "max_length": ctx, "min_length": 0, "no_repeat_ngram_size": 0, "num_beams": 1,
                "num_return_sequences": 1, "past_present_share_buffer": True, "repetition_penalty": 1.0,
                "temperature": 1.0, "top_k": 50, "top_p": 1.0,
            },
        }

