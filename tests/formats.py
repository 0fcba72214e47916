"""One check for every output format: the grid a format states (bits, group size) is the grid its tensors hold.

`check_stated_grids(out)` reads our artefact (qcompiler.json) and every serving folder or ONNX model in it and
raises AssertionError naming the format, layer and field that disagree; it returns the number of layer grids
checked per format so a caller can tell that each format was really looked at."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file


def safetensors_in(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _groups(k: int, group_size: int | None) -> int:
    return 1 if not group_size or group_size <= 0 else math.ceil(k / group_size)


def _ours(out: Path) -> int:
    desc = json.loads((out / "qcompiler.json").read_text())
    tensors = safetensors_in(out)
    allowed = [desc["scheme"]["weights"]] + [s["weights"] for _, s in desc["scheme"]["overrides"] if s]
    n = 0
    for rec in desc["layers"].values():
        w = rec.get("weights")
        if rec["op"] == "linear" or w is None:
            continue
        assert w in allowed, f"qcompiler.json: layer {rec['path']} holds {w}, which no stated scheme has"
        names = rec["tensors"]
        scale = tensors[names.get("scale") or names["weight_scale"]]
        if w["granularity"] == "tensor":
            assert scale.numel() == 1, rec["path"]
        else:
            want = _groups(rec["in_features"], w["group_size"] if w["granularity"] == "group" else None)
            got = scale.reshape(rec["out_features"], -1).shape[1]
            assert got == want, f"qcompiler.json: {rec['path']} states group {w['group_size']}, scales hold {got} groups"
        n += 1
    return n


def _compressed_tensors(folder: Path) -> int:
    qc = json.loads((folder / "config.json").read_text())["quantization_config"]
    tensors = safetensors_in(folder)
    grids = [g["weights"] for g in qc["config_groups"].values() if g.get("weights")]
    n = 0
    for name, scale in tensors.items():
        if not name.endswith(".weight_scale"):
            continue
        base = name.removesuffix(".weight_scale")
        shape = tensors.get(base + ".weight_shape")
        k = int(shape[1]) if shape is not None else tensors[base + ".weight"].shape[1]
        ok = []
        for w in grids:
            g = w["group_size"] if w["strategy"] == "group" else None
            groups_ok = w["strategy"] == "tensor" or scale.reshape(scale.shape[0], -1).shape[1] == _groups(k, g)
            packed = tensors.get(base + ".weight_packed")
            bits_ok = packed is None or packed.shape[1] == math.ceil(k * w["num_bits"] / 32)
            ok.append(groups_ok and bits_ok)
        assert any(ok), f"compressed-tensors: {base} ({list(scale.shape)} scales, K={k}) matches no stated group {grids}"
        n += 1
    return n


def _awq_gptq(folder: Path, packed_along_k: bool) -> int:
    qc = json.loads((folder / "config.json").read_text())["quantization_config"]
    bits, g = qc["bits"], qc["group_size"]
    tensors = safetensors_in(folder)
    n = 0
    for name, scales in tensors.items():
        if not name.endswith(".scales"):
            continue
        base = name.removesuffix(".scales")
        qweight = tensors[base + ".qweight"]
        k = qweight.shape[0] * (32 // bits) if packed_along_k else qweight.shape[0]
        assert scales.shape[0] == _groups(k, g), f"{folder.name}: {base} states group {g}, scales {list(scales.shape)}"
        n += 1
    return n


def _lmdeploy(folder: Path) -> int:
    """smooth_quant: one fp32 scale per output channel beside an 8-bit weight; awq: the AWQ folder's check."""
    qc = json.loads((folder / "config.json").read_text())["quantization_config"]
    if qc["quant_method"] == "awq":
        return _awq_gptq(folder, packed_along_k=False)
    assert qc["quant_method"] == "smooth_quant", f"{folder.name}: quant_method {qc['quant_method']}"
    tensors = safetensors_in(folder)
    n = 0
    for name, scale in tensors.items():
        if name.endswith(".scale"):
            weight = tensors[name.removesuffix(".scale") + ".weight"]
            assert weight.element_size() == 1 and scale.shape == (weight.shape[0], 1), f"{folder.name}: {name}"
            n += 1
    return n


def _msmodelslim(folder: Path, in_features: dict[str, int]) -> int:
    desc = json.loads((folder / "quant_model_description.json").read_text())
    g = desc.get("group_size", 0)
    tensors = safetensors_in(folder)
    n = 0
    for name, kind in desc.items():
        if not (name.endswith(".weight") and kind in ("W4A16", "W8A16", "W8A8_DYNAMIC", "W4A8_DYNAMIC")):
            continue
        base = name.removesuffix(".weight")
        scale = tensors[base + ".weight_scale"]
        second = tensors.get(base + ".weight_scale_second")  # (two-level W4A8 groups: the per-group level)
        held = (second if second is not None else scale).reshape(scale.shape[0], -1).shape[1]
        k = in_features[base]
        assert held == _groups(k, g), f"msmodelslim: {base} states group_size {g}, holds {held} groups of K={k}"
        n += 1
    return n


def _in_features(out: Path) -> dict[str, int]:
    """Every original layer's input size, from our description (fused layers' members included)."""
    desc = json.loads((out / "qcompiler.json").read_text())
    sizes = {}
    for rec in desc["layers"].values():
        for member in rec.get("fused_from") or [{"path": rec["path"]}]:
            sizes[member["path"]] = rec["in_features"]
    return sizes


def _onnx(path: Path) -> int:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    dims = {t.name: list(t.dims) for t in model.graph.initializer}
    n = 0
    for node in model.graph.node:
        if node.op_type != "MatMulNBits":
            continue
        a: dict[str, Any] = {x.name: onnx.helper.get_attribute_value(x) for x in node.attribute}
        scales = math.prod(dims[node.input[2]])
        want = a["N"] * _groups(a["K"], a["block_size"])
        assert scales == want, f"onnx: {node.name} states block {a['block_size']} of K={a['K']}, holds {scales} scales"
        n += 1
    return n


def check_stated_grids(out: Path) -> dict[str, int]:
    """{format: layers checked} for our artefact and every serving format / ONNX model written beside it."""
    checked = {"qcompiler": _ours(out)}
    if (out / "compressed-tensors").is_dir():
        checked["compressed-tensors"] = _compressed_tensors(out / "compressed-tensors")
    if (out / "awq").is_dir():
        checked["awq"] = _awq_gptq(out / "awq", packed_along_k=False)
    if (out / "gptq").is_dir():
        checked["gptq"] = _awq_gptq(out / "gptq", packed_along_k=True)
    if (out / "lmdeploy").is_dir():
        checked["lmdeploy"] = _lmdeploy(out / "lmdeploy")
    if (out / "msmodelslim").is_dir():
        checked["msmodelslim"] = _msmodelslim(out / "msmodelslim", _in_features(out))
    if (out / "model.onnx").is_file():
        checked["onnx"] = _onnx(out / "model.onnx")
    return checked
