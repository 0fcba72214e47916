"""A vision-language model's vision tower, quantized linear by linear (`--vision-scheme`, off by default).

By default a VLM's vision tower and projector stay float (frontends/multimodal.py). `--vision-scheme` quantizes the
linears of the vision encoder's blocks — the ModuleList with the most parameters outside the language model (Qwen2-VL's
`model.visual.blocks`, CLIP's / SigLIP's `encoder.layers`) — as msModelSlim does for ViTs; the patch embedding, the
merger / projector and the language model's head stay as they are. Each such linear W [N, K] (bias b) becomes

    w8a16         y = x · ŵᵀ + b,                   ŵ = q · s,  q = clamp(round(W / s), −128, 127),  s = max|W_n| / 127
    w8a8_dynamic  y = s_x · s_w ⊙ (q_x · qᵀ) + b,   q_x = round(x / s_x) per token, s_x = max|x_t| / 127
    w8a8          the same with one static s_x per tensor: max |x| over the calibration images (--calib-images) / 127

i.e. exactly `qc::linear_woq` / `qc::linear_w8a8`, the ops the decoder's lowered blocks call (RTN: the vision tower
is not traced, so no graph pass — smoothing, GPTQ — runs on it; at 8 bits min-max RTN is within ~40 dB of float).
Each layer is described by a LayerRecord (op, grids, tensor names) like a block's layers, so the artefact
(qcompiler.json "vision"), the serving formats (export/serving.py: quantized layers instead of float ones) and the
runtime (QuantizedLinear) read one description.

The vision tower runs before the language model in the prologue, so the decoder is calibrated on the image features
of the quantized tower.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from qcompiler.errors import PipelineError
from qcompiler.frontends.multimodal import is_multimodal, language_model_path
from qcompiler.ir.records import LayerRecord
from qcompiler.kernels.packing import store_weight_codes
from qcompiler.numerics import (
    act_qparams_from_range,
    dequantize_weight,
    group_size_of,
    quantize_weight,
    sqnr_db,
    weight_qparams,
)
from qcompiler.schemes import QuantScheme, get_scheme

VISION_SCHEMES = ("w8a16", "w8a8_dynamic", "w8a8")


def vision_scheme(name: str) -> QuantScheme:
    if name not in VISION_SCHEMES:
        raise PipelineError(f"--vision-scheme takes {', '.join(VISION_SCHEMES)}, not '{name}'")
    return get_scheme(name)


def vision_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The vision encoder's blocks: outside the language model, the ModuleList as long as the vision config's depth
    (`depth` / `num_hidden_layers`) holding the most parameters — not Qwen3-VL's DeepStack mergers, a shorter list of
    wide linears — or, where the config states no depth, the ModuleList holding the most parameters."""
    language = language_model_path(model)
    vision_config = getattr(model.config, "vision_config", None)
    depth = getattr(vision_config, "depth", None) or getattr(vision_config, "num_hidden_layers", None)
    best: tuple[bool, int, str, nn.ModuleList] | None = None
    for name, mod in model.named_modules():
        if not language or name == language or name.startswith(language + "."):
            continue
        if isinstance(mod, nn.ModuleList) and len(mod) > 0:
            key = (len(mod) == depth, sum(p.numel() for p in mod.parameters()))
            if best is None or key > best[:2]:
                best = (*key, name, mod)
    if best is None:
        raise PipelineError(f"{model.__class__.__name__}: no vision encoder blocks found outside the language model")
    return best[2], best[3]


def vision_linears(model: nn.Module) -> list[str]:
    """Module paths of the linears inside the vision encoder's blocks."""
    if not is_multimodal(model.config):
        raise PipelineError(f"--vision-scheme quantizes a vision-language model's vision tower; "
                            f"'{model.config.model_type}' has none")
    prefix, blocks = vision_blocks(model)
    names = [f"{prefix}.{n}" for n, m in blocks.named_modules() if isinstance(m, nn.Linear)]
    if not names:
        raise PipelineError(f"the vision blocks '{prefix}' hold no linear layers to quantize")
    return names


def observe_input_ranges(model: nn.Module, names: Iterable[str], run: Any) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(min, max) of every input of the linears `names` while `run()` runs the model on calibration images."""
    ranges: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    handles = []

    def hook(name: str) -> Any:
        def record(_mod: nn.Module, args: tuple) -> None:
            x = args[0].detach().float()
            lo, hi = x.min(), x.max()
            if name in ranges:
                lo, hi = torch.minimum(lo, ranges[name][0]), torch.maximum(hi, ranges[name][1])
            ranges[name] = (lo, hi)
        return record

    for name in names:
        handles.append(model.get_submodule(name).register_forward_pre_hook(hook(name)))
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    missing = [n for n in names if n not in ranges]
    if missing:
        raise PipelineError(f"the calibration images never reached vision layers {missing[:3]}: no static input "
                            "range to set (use --vision-scheme w8a8_dynamic)")
    return ranges


def quantize_linear(name: str, linear: nn.Linear, scheme: QuantScheme,
                    input_range: tuple[torch.Tensor, torch.Tensor] | None) -> tuple[LayerRecord, dict[str, torch.Tensor]]:
    """The LayerRecord and tensors (by role) of `linear` quantized with `scheme` (see the module docstring)."""
    args = scheme.weights
    assert args is not None
    w = linear.weight.detach().float()
    n, k = w.shape
    scale, _ = weight_qparams(w, args)
    q = quantize_weight(w, scale, None, args)
    group = group_size_of(args, k)
    w_sqnr = sqnr_db(w, dequantize_weight(q, scale, None, group))
    acts = scheme.activations
    activations: dict[str, Any] | None = None
    if acts is None:
        op, tensors = "linear_woq", {"qweight": store_weight_codes(q, args.bits, args.symmetric),
                                     "scale": scale.float().contiguous()}
    else:
        op, tensors = "linear_w8a8", {"qweight": q.to(torch.int8).contiguous(),
                                      "weight_scale": scale.reshape(-1).float().contiguous()}
        if acts.dynamic:
            activations = {"bits": 8, "dynamic": True, "granularity": "token", "symmetric": True}
        else:
            assert input_range is not None
            x_scale, _ = act_qparams_from_range(*input_range, acts)  # (symmetric: zero point 0)
            tensors["input_scale"] = x_scale.reshape(()).float()
            activations = {"bits": 8, "dynamic": False, "granularity": "tensor", "symmetric": True}
    record = LayerRecord(
        op=op, path=name, role="vision", in_features=k, out_features=n, weights=dataclasses.asdict(args),
        group_size=group, weight_sqnr_db=round(w_sqnr, 2), fused_from=None,
        bias=f"{name}.bias" if linear.bias is not None else None, sparsity=None, input_rotation=None,
        activations=activations, tensors={role: f"{name}.{role}" for role in tensors},
    )
    return record, tensors


class QuantizedLinear(nn.Module):
    """A linear replaced by the kernel op its LayerRecord names; codes and scales are buffers named by role, the
    bias stays a parameter (a float weight like the tower's others)."""

    def __init__(self, record: LayerRecord, tensors: Mapping[str, torch.Tensor], bias: torch.Tensor | None):
        super().__init__()
        if record.op not in ("linear_woq", "linear_w8a8"):
            raise PipelineError(f"vision layer '{record.path}': op '{record.op}' is not a vision-tower op")
        self.layer_record = record
        for role, t in tensors.items():
            self.register_buffer(role, t)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    def record_tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor of the layer under its checkpoint name (the record's names)."""
        out = {name: getattr(self, role) for role, name in self.layer_record.tensors.items()}
        if self.layer_record.bias is not None and self.bias is not None:
            out[self.layer_record.bias] = self.bias
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r = self.layer_record
        if r.op == "linear_woq":
            assert r.weights is not None and r.group_size is not None
            return torch.ops.qc.linear_woq(x, self.qweight, self.scale, None, self.bias, r.weights["bits"],
                                           r.group_size, r.in_features)
        return torch.ops.qc.linear_w8a8(x, self.qweight, self.weight_scale, getattr(self, "input_scale", None),
                                        None, self.bias)


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent), leaf, module)


def quantize_vision_tower(model: nn.Module, scheme_name: str, run_images: Any | None) -> dict[str, LayerRecord]:
    """Replace the vision encoder's linears of `model` (float weights loaded) by QuantizedLinear; returns their records.
    `run_images`: runs the model on the calibration images (static activations need it), or None."""
    scheme = vision_scheme(scheme_name)
    names = vision_linears(model)
    ranges: Mapping[str, tuple[torch.Tensor, torch.Tensor]] = {}
    if scheme.activations is not None and not scheme.activations.dynamic:
        if run_images is None:
            raise PipelineError("--vision-scheme w8a8 (static activations) calibrates on images: add --calib-images "
                                "DIR, or use --vision-scheme w8a8_dynamic")
        ranges = observe_input_ranges(model, names, run_images)
    records = {}
    for name in names:
        linear = model.get_submodule(name)
        assert isinstance(linear, nn.Linear)
        record, tensors = quantize_linear(name, linear, scheme, ranges.get(name))
        bias = None if linear.bias is None else linear.bias.detach().clone()
        _replace(model, name, QuantizedLinear(record, tensors, bias))
        records[name] = record
    return records


def load_vision_tower(model: nn.Module, records: Mapping[str, LayerRecord], read: Any) -> None:
    """Replace the linears `records` names by QuantizedLinear with tensors read by `read(name)` (an artefact's
    checkpoint); their biases stay meta parameters, loaded with the other outer weights."""
    for name, record in records.items():
        try:
            linear = model.get_submodule(name)
        except AttributeError:
            linear = None
        if not isinstance(linear, nn.Linear):
            raise PipelineError(f"vision layer '{name}' of the description is not a linear of this model")
        tensors = {role: read(t) for role, t in record.tensors.items()}
        bias = None if record.bias is None else torch.empty(record.out_features, device="meta")
        _replace(model, name, QuantizedLinear(record, tensors, bias))
