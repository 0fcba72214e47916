"""The family × scheme × target support matrix, one test per family and scheme (issue 18).

Each test quantizes the family's tiny model (tests/family_configs.py) for the cuda and the ascend target and
checks three cells against transformers' own model:

- reference: our artefact (`load_quantized`) equals `transformers_twin` — transformers' model with the artefact's
  dequantized weights and activation grids (tests/twin.py). The artefact is target independent (the two runs'
  block files are asserted equal), so the cuda run's artefact stands for the reference target's — except where the
  reference target's default pipeline differs (a target that rotates the residual stream before static activations,
  Target.rotates_static_activations; none does by default), which is then quantized for the reference target itself.
- cuda: transformers loads the compressed-tensors folder (the client decompresses it) and its logits equal ours.
  Where transformers cannot build the client model on the CPU (it cannot stack int8 per-expert tensors), the cell
  records why, prefixed "weights:" (◐ in the table) when the compressed-tensors package's own compressor
  decompresses every layer to our weights bit for bit. Where the source checkpoint stores its experts stacked (gpt-oss,
  Llama 4, Qwen3-VL-MoE), the folder holds them one linear each, the layout vLLM's loaders of those families read and
  transformers' does not: that compressor check is the cell (◐).
- ascend: the msModelSlim folder, run by our loader as its NPU call sequences, equals ours.
- onnxruntime: a third run; the exported decoder, run by onnxruntime on the prompt and then through its KV cache,
  equals that run's artefact (target options chosen so that the kernels compute exactly what it states).

Tolerances. Weight-only: the same weights in float32, |Δ| / |y| ≤ 1e-5 (summation order; quantization itself moves
these logits by more than 1e-4, asserted so that the check can fail). Quantized activations: two float32 computations of
the same network can put a value on the other side of a rounding tie (epilogues that round s_x·s_w differently,
fused vs split GEMMs) and change one activation code by one step. One step is max|x|/127 on one of K inputs, about
1/(127·√K/crest) of the token's activation norm: a few 1e-3 at K = 64, and it spreads through later attention. A
missing or wrong activation grid (no hook, absmax/127.5) moves every activation instead, so the logits move by about
e, what the grids themselves change (the twin without its hooks). The check: error < e / 2.

What a cell records (qcompiler/targets/families.json, printed by `qcompile schemes --families --markdown`): "ok"
when these checks passed, or the one-line reason of a refusal (ours or the client's). Every test asserts that its
cells equal the recorded ones; `python scripts/support_matrix.py` reruns the tests and rewrites the file.
Columns beyond FAST_SCHEMES are marked `matrix` (run by that script, not by CI: about ten minutes on two cores).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch
from family_configs import FAMILIES, Family, family_inputs, make_family_model, native_reference
from tiny import TEXT
from twin import transformers_twin

from qcompiler.driver import QuantizeConfig, quantize
from qcompiler.errors import ArtifactError, QCompilerError
from qcompiler.frontends.multimodal import model_logits
from qcompiler.runtime import load_quantized
from qcompiler.schemes import get_scheme
from qcompiler.targets.matrix import MATRIX_SCHEMES, recorded_family_matrix

FAST_SCHEMES = ("w8a16", "w8a8_dynamic")
WRITE = os.environ.get("QCOMPILE_MATRIX_OUT")  # scripts/support_matrix.py: append outcomes here (JSON lines)


@pytest.fixture(scope="module")
def family_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return {f.model_type: make_family_model(root / f.model_type, f) for f in FAMILIES}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


# onnxruntime: the options under which its kernels compute exactly what the artefact states (the defaults trade that
# for speed: MatMulNBits with int8 activations, an int8 head, w8a8_dynamic through MatMulNBits)
EXACT_ONNX = {"accuracy_level": "0", "lm_head_bits": "float", "w8a8_dynamic": "exact"}


def _quantize(model: Path, out: Path, scheme: str, target: str) -> str | None:
    """None when written, else the refusal's one line."""
    spec = MATRIX_SCHEMES[scheme]
    try:
        quantize(QuantizeConfig(model=model, scheme=get_scheme(spec["preset"], group_size=spec.get("group_size")),
                                algo=spec.get("algo", "rtn"), out=out, target=target, calib_texts=[TEXT],
                                num_samples=2, seq_len=32, batch_size=2, progress=False,
                                target_options=EXACT_ONNX if target == "onnxruntime" else {}), log=lambda _: None)
    except QCompilerError as e:
        return str(e).splitlines()[0].replace(str(model), "<model>")  # (the reason, without this run's folder)
    return None


def _default_pipeline(scheme: str, target: str) -> str:
    from qcompiler.driver import default_pipeline
    from qcompiler.pm.pipeline import format_pipeline
    from qcompiler.targets import get_target

    spec = MATRIX_SCHEMES[scheme]
    return format_pipeline(default_pipeline(get_scheme(spec["preset"], group_size=spec.get("group_size")),
                                            get_target(target), spec.get("algo", "rtn")))


def _token_rel(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return ((a - b).norm(dim=-1) / b.norm(dim=-1)).flatten()


def _check_close(got: torch.Tensor, expect: torch.Tensor, act_free: torch.Tensor | None, where: str) -> None:
    """Weight-only: equal up to float summation order. With quantized activations, two correct implementations
    differ where an input sits on a rounding boundary of its grid, a one-step flip; a flip that reaches a router
    can switch a token's experts (gpt-oss w8a8s: 1 of 80 tokens in layer 0, top-2 gap 0.004), so a few tokens may
    differ by as much as the activation error itself. What must hold on the typical token is that the two agree
    far better than either agrees with the model without activation quantization: median per-token error below
    half of act_free's. (A wrong scale or zero point moves every token: the median sees it.)"""
    if act_free is None:
        err = _rel(got, expect)
        assert err < 1e-5, (where, err)
    else:
        err, budget = float(_token_rel(got, expect).median()), float(_token_rel(act_free, expect).median())
        assert err < 0.5 * budget, (where, err, budget)


def _stated_activations(out: Path) -> set[str]:
    """How the compressed-tensors config states its groups' input activations ("dynamic", "static")."""
    qc = json.loads((out / "compressed-tensors" / "config.json").read_text())["quantization_config"]
    acts = [g.get("input_activations") for g in qc["config_groups"].values()]
    return {("dynamic" if a["dynamic"] else "static") for a in acts if a}


def _check_client_weights(client: torch.nn.Module, artefact: Path, where: str) -> None:
    """Dynamic per-token activations: compressed-tensors' CPU emulation scales them by absmax/127.5 where vLLM's
    kernels and ours use absmax/127 (see test_cuda_target), so its logits differ by about as much as activation
    quantization itself. What must agree is exact: the client's decompressed weights are ours, bit for bit."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightRenaming, rename_source_key
    from twin import artefact_layers

    layers, _ = artefact_layers(artefact)
    # (the artefact names layers as the checkpoint does; the client as transformers renames them on loading)
    rules = [r for r in get_model_conversion_mapping(client) if isinstance(r, WeightRenaming)]
    state = client.state_dict()
    checked = 0
    for layer in layers:
        name, _ = rename_source_key(layer.name + ".weight", rules, [], base_model_prefix=client.base_model_prefix,
                                    meta_state_dict=state)
        try:
            mod = client.get_submodule(name.removesuffix(".weight"))
        except AttributeError:  # (an expert stacked by transformers' loader: no module of its own)
            continue
        assert torch.equal(mod.weight.float(), layer.dequantized()), (where, layer.name)
        checked += 1
    assert checked >= len([la for la in layers if ".experts." not in la.name]) > 0, where


def _package_decompresses_every_layer(out: Path, artefact: Path) -> bool:
    """Where transformers cannot build the client model (it cannot stack int8 per-expert tensors on the CPU), the
    compressed-tensors package's own compressor still decompresses each layer: equal to our dequantized weights,
    bit for bit, for every layer."""
    from compressed_tensors.compressors import IntQuantizationCompressor, PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationScheme
    from safetensors.torch import load_file
    from twin import artefact_layers

    from qcompiler.export.compressed_tensors import CompressedTensorsFormat
    from qcompiler.export.serving import expert_checkpoint_name

    folder = out / "compressed-tensors"
    qc = json.loads((folder / "config.json").read_text())["quantization_config"]
    if len(qc["config_groups"]) != 1:
        return False
    group = next(iter(qc["config_groups"].values()))
    scheme = QuantizationScheme(targets=group["targets"], weights=group["weights"])
    compressor = {"int-quantized": IntQuantizationCompressor, "pack-quantized": PackedQuantizationCompressor}.get(
        qc["format"])
    if compressor is None:
        return False
    files: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        files.update(load_file(str(f)))
    layers, _ = artefact_layers(artefact)
    # (per-expert linears under the names the format's clients read for this family: GraniteMoE's w1 / w3 / w2)
    model_type = json.loads((folder / "config.json").read_text()).get("model_type")
    leaves = CompressedTensorsFormat.expert_leaves.get(model_type, {})
    for layer in layers:
        name = expert_checkpoint_name(leaves, layer.name)
        local = {k.removeprefix(name + "."): v for k, v in files.items() if k.startswith(name + ".")}
        assert local, f"{name}: not in the compressed-tensors folder"
        got = compressor.decompress(local, scheme)["weight"]
        assert torch.equal(got.float(), layer.dequantized()), layer.name
    return bool(layers)


def _stores_experts_stacked(model: Path) -> bool:
    """Whether the source checkpoint keeps a layer's experts in one stacked tensor (gpt-oss, Llama 4, GraniteMoE)."""
    from safetensors import safe_open

    names: list[str] = []
    for f in sorted(model.glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            names += list(st.keys())
    stacked = ("experts.gate_up_proj", "experts.gate_up_proj_blocks", "input_linear.weight")  # (+ gpt-oss's MXFP4)
    return any(n.endswith(stacked) for n in names)


def _digest(out: Path) -> str:
    return hashlib.sha256(b"".join(p.read_bytes() for p in sorted(out.glob("block-*.safetensors")))).hexdigest()


def _cells(family: Family, model: Path, scheme: str, tmp: Path) -> dict[str, str]:
    from transformers import AutoConfig

    from qcompiler.frontends.multimodal import auto_model_class
    from qcompiler.runtime.msmodelslim import load_msmodelslim

    reference = native_reference(family, model)  # (what transformers builds: the model itself, or what it is read as)
    inputs = family_inputs(family, reference)
    auto = auto_model_class(AutoConfig.from_pretrained(str(reference)))
    cells: dict[str, str] = {}
    runs = {t: _quantize(model, tmp / t, scheme, t) for t in ("cuda", "ascend")}
    artefact = next((tmp / t for t, refusal in runs.items() if refusal is None), None)
    if artefact is None:
        refusal = _quantize(model, tmp / "reference", scheme, "reference")
        artefact = None if refusal else tmp / "reference"
        cells["reference"] = refusal or "ok"
    if runs["cuda"] is None and runs["ascend"] is None:
        assert _digest(tmp / "cuda") == _digest(tmp / "ascend"), "the artefact depends on the target"
    if artefact is None:  # (refused for cuda and ascend: no artefact to compare an onnxruntime export with either)
        onnx_refusal = _quantize(model, tmp / "onnxruntime", scheme, "onnxruntime")
        assert onnx_refusal is not None, "written for onnxruntime only: add its check here"
        return {**cells, **{t: r or "ok" for t, r in runs.items()}, "onnxruntime": onnx_refusal}

    weight_only = "a16" in scheme
    # the reference target's own artefact where its default pipeline differs (e.g. static w8a8 rotated)
    ref_artefact = artefact
    if "reference" not in cells and _default_pipeline(scheme, "reference") != _default_pipeline(scheme, "cuda"):
        refusal = _quantize(model, tmp / "reference", scheme, "reference")
        assert refusal is None, refusal
        ref_artefact = tmp / "reference"
    with torch.no_grad():
        ours = model_logits(load_quantized(artefact), **inputs)
        act_free = None if weight_only else model_logits(transformers_twin(reference, artefact, activations=False), **inputs)
        ref_ours = ours if ref_artefact == artefact else model_logits(load_quantized(ref_artefact), **inputs)
        ref_act_free = act_free if ref_artefact == artefact or weight_only else \
            model_logits(transformers_twin(reference, ref_artefact, activations=False), **inputs)
        try:
            twin = model_logits(transformers_twin(reference, ref_artefact), **inputs)
        except ArtifactError as e:  # (a quantized KV cache where transformers' attention cannot take one)
            twin = None
            cells["reference"] = "not checked: " + str(e).split(": ", 1)[1]
        float_logits = model_logits(auto.from_pretrained(str(reference), dtype=torch.float32), **inputs)
    assert _rel(ref_ours, float_logits) > 1e-4, "nothing was quantized"  # (10× the weight-only tolerance)
    if twin is not None:
        _check_close(ref_ours, twin, ref_act_free, f"{family.model_type} {scheme}: artefact vs transformers twin")
        cells["reference"] = "ok"

    if runs["cuda"] is None and _stores_experts_stacked(model):
        assert _package_decompresses_every_layer(tmp / "cuda", artefact), "compressed-tensors' compressor disagrees"
        cells["cuda"] = ("weights: compressed-tensors decompresses every layer to ours, bit for bit; the experts are "
                         "written one linear each (vLLM's loader of this family reads them so), which transformers, "
                         "reading this family's experts stacked, does not load")
    elif runs["cuda"] is None:
        try:
            client = auto.from_pretrained(str(tmp / "cuda" / "compressed-tensors"), dtype=torch.float32)
            with torch.no_grad():
                theirs = model_logits(client, **inputs)
        except Exception as e:  # the client's own refusal is the cell's reason
            import transformers

            reason = (f"transformers {transformers.__version__} cannot load this compressed-tensors folder on the CPU "
                      f"({type(e).__name__}: {str(e).splitlines()[0][:100]})")
            if _package_decompresses_every_layer(tmp / "cuda", artefact):
                reason = "weights: compressed-tensors decompresses every layer to ours, bit for bit; " + reason
            cells["cuda"] = reason
        else:
            where = f"{family.model_type} {scheme}: compressed-tensors vs ours"
            if "dynamic" in _stated_activations(tmp / "cuda"):
                _check_client_weights(client, artefact, where)
            else:
                _check_close(theirs, ours, act_free, where)
            cells["cuda"] = "ok"
    else:
        cells["cuda"] = runs["cuda"]
    if runs["ascend"] is None:
        try:
            loaded = load_msmodelslim(tmp / "ascend" / "msmodelslim")
        except QCompilerError as e:
            cells["ascend"] = f"msModelSlim loader: {str(e).splitlines()[0].replace(str(tmp), '<out>')[:160]}"
        else:
            with torch.no_grad():
                theirs = model_logits(loaded, **inputs)
            _check_close(theirs, ours, act_free, f"{family.model_type} {scheme}: msModelSlim loader vs ours")
            cells["ascend"] = "ok"
    else:
        cells["ascend"] = runs["ascend"]
    cells["onnxruntime"] = _onnxruntime_cell(model, reference, scheme, tmp, inputs["input_ids"], act_free is not None)
    return cells


def _onnxruntime_cell(model: Path, reference: Path, scheme: str, tmp: Path, ids: torch.Tensor,
                      quantized_acts: bool) -> str:
    """The exported decoder run by onnxruntime (prompt, then the KV cache one token at a time) equals the artefact of
    the same run: |Δ| / |y| ≤ 1e-4 (MatMulNBits and GroupQueryAttention accumulate in their own order), or, with
    quantized activations, the rounding-tie bound above against the artefact's act-free twin."""
    from qcompiler.runtime.onnxruntime import OrtCausalLM

    refusal = _quantize(model, tmp / "onnxruntime", scheme, "onnxruntime")
    if refusal is not None:
        return refusal
    out = tmp / "onnxruntime"
    with torch.no_grad():
        ours = load_quantized(out)(ids).logits
        act_free = transformers_twin(reference, out, activations=False)(ids).logits if quantized_acts else None
    session = OrtCausalLM(out)
    prompt = session(ids).logits
    _, past = session.run(ids[:, :32].numpy())  # prefill 32 tokens, then decode through the KV cache
    steps = []
    for t in (32, 33):
        logits, past = session.run(ids[:, t:t + 1].numpy(), past)
        steps.append(torch.from_numpy(logits))
    where = f"{model.name} {scheme}: onnxruntime vs ours"  # (`reference`: the transformers model it is read as)
    if act_free is None:
        assert _rel(prompt, ours) < 1e-4, (where, _rel(prompt, ours))
        for j, step in enumerate(steps):
            assert _rel(step[:, 0], ours[:, 32 + j]) < 1e-4, (where, "decode", j)
    else:
        _check_close(prompt, ours, act_free, where)
    return "ok"


# cells CI runs beyond FAST_SCHEMES: each way a KV cache is found and emulated (SDPA, eager matmuls, MLA's latent,
# an attention that calls torch's SDPA itself)
FAST_CELLS = {("w8a8c8", "llama"), ("w8a8c8", "gemma2"), ("w8a8c8", "deepseek_v3"), ("w8a8c8", "falcon")}


def _params():
    for scheme in MATRIX_SCHEMES:
        for family in FAMILIES:
            fast = scheme in FAST_SCHEMES or (scheme, family.model_type) in FAST_CELLS
            marks = [] if fast else [pytest.mark.matrix]
            yield pytest.param(family, scheme, id=f"{family.model_type}-{scheme}", marks=marks)


@pytest.mark.slow
@pytest.mark.parametrize(("family", "scheme"), list(_params()))
def test_family_scheme_cells_equal_the_recorded_matrix(family_models, tmp_path, family, scheme):
    cells = _cells(family, family_models[family.model_type], scheme, tmp_path)
    if WRITE:
        with open(WRITE, "a") as f:
            f.write(json.dumps({"family": family.model_type, "row": family.row, "real": family.real,
                                "scheme": scheme, "cells": cells}) + "\n")
        return
    recorded = recorded_family_matrix()
    assert recorded["cells"].get(family.model_type, {}).get(scheme) == cells, (
        "the support matrix changed: rerun `python scripts/support_matrix.py` and commit "
        "qcompiler/targets/families.json and README.md")


def test_recorded_matrix_names_every_family_and_scheme():
    recorded = recorded_family_matrix()
    assert [f["model_type"] for f in recorded["families"]] == [f.model_type for f in FAMILIES]
    assert all(set(recorded["cells"][f.model_type]) == set(MATRIX_SCHEMES) for f in FAMILIES)


def test_readme_family_matrix_is_the_generated_one():
    from qcompiler.targets.matrix import family_matrix

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    begin, end = "<!-- family-matrix:begin -->\n", "\n<!-- family-matrix:end -->"
    assert begin in readme and end in readme
    assert readme.split(begin, 1)[1].split(end, 1)[0] == family_matrix()


def test_cli_prints_the_family_matrix(capsys):
    from qcompiler.cli import main
    from qcompiler.targets.matrix import family_matrix

    assert main(["schemes", "--families"]) == 0
    assert capsys.readouterr().out.strip() == family_matrix().strip()
