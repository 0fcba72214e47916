"""LMDeploy as a consumer (issue 17): `--target cuda --target-option format=lmdeploy`, and on the ascend target
(`format=msmodelslim,lmdeploy`: LMDeploy's PyTorch engine on Atlas 800T A2 reads the same folders).

LMDeploy itself does not import on this machine (its package imports mmengine and CUDA-only extensions), so the
files are checked against readers written from LMDeploy 0.18's own code, read, not run:
- PyTorch engine W8A8 (`lmdeploy/pytorch/nn/linear/w8a8.py`, `lmdeploy/pytorch/models/q_modules.py`,
  `lmdeploy/pytorch/config.py`): quantization_config {quant_method: smooth_quant, quant_dtype}, per linear `weight`
  int8 [N, K] and `scale` fp32 [N, 1] (ŵ = weight·scale) and `bias`; activations quantized per token at run time,
  s_t = max|x_t| / 127; `modules_to_not_convert` full module names.
- TurboMind W4A16: the AWQ gemm folder (its unpacker is tests/test_cuda_target.py's), group 64 or 128.

The W8A8 oracle is transformers' model built from the written folder with each linear's ŵ and a per-token hook —
nothing of ours runs — compared with our artefact of the same run (`load_quantized`). Tolerance as the support
matrix's for quantized activations: below half of what the activation grids themselves move the logits.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from family_configs import BY_TYPE, make_family_model
from formats import check_stated_grids, safetensors_in
from tiny import TEXT
from transformers import AutoModelForCausalLM

from qcompiler.driver import QuantizeConfig, quantize
from qcompiler.errors import SchemeError
from qcompiler.runtime import load_quantized
from qcompiler.runtime.lmdeploy import load_lmdeploy
from qcompiler.schemes import get_scheme


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("lmdeploy")
    return {t: make_family_model(root / t, BY_TYPE[t]) for t in ("llama", "qwen2_moe")}


def _quantize(model: Path, out: Path, scheme: str, formats: str = "lmdeploy", group: int | None = None,
              kv_cache: str | None = None, target: str = "cuda") -> dict:
    s = get_scheme(scheme, group_size=group, kv_cache=kv_cache)
    return quantize(QuantizeConfig(model=model, scheme=s, out=out, target=target, calib_texts=[TEXT], num_samples=4,
                                   seq_len=32, batch_size=2, progress=False, target_options={"format": formats}),
                    log=lambda _: None)


def _lmdeploy_reader(folder: Path, activations: bool = True) -> torch.nn.Module:
    """transformers' model of an LMDeploy smooth_quant folder, computing what LMDeploy's W8A8 modules compute."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(folder))
    quant = config.quantization_config
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="eager").eval()
    tensors = safetensors_in(folder)
    state = model.state_dict()
    with torch.no_grad():
        for name, t in tensors.items():
            module = name.rsplit(".", 1)[0]
            if name.endswith(".scale"):
                continue
            if name.endswith(".weight") and f"{module}.scale" in tensors:  # a W8A8 linear: ŵ = weight · scale, input quantized per token
                state[name].copy_(t.float() * tensors[f"{module}.scale"])
                if activations:
                    model.get_submodule(module).register_forward_pre_hook(_per_token_int8)
            else:
                state[name].copy_(t.float())
    model.lmdeploy_quantization = quant
    return model


def _per_token_int8(_mod, args):
    x = args[0]
    s = (x.abs().amax(-1, keepdim=True) / 127).clamp_min(1e-8)
    return (torch.clamp(torch.round(x / s), -128, 127) * s, *args[1:])


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("family", ["llama", "qwen2_moe"])
def test_w8a8_smooth_quant_folder_is_what_lmdeploy_reads_and_computes_our_logits(models, tmp_path, family):
    out = tmp_path / "q"
    _quantize(models[family], out, "w8a8_dynamic")
    folder = out / "lmdeploy"
    assert check_stated_grids(out)["lmdeploy"] > 0
    config = json.loads((folder / "config.json").read_text())
    quant = config["quantization_config"]
    assert quant["quant_method"] == "smooth_quant" and quant["quant_dtype"] == "int8"
    tensors = safetensors_in(folder)
    linears = {n.rsplit(".", 1)[0] for n in tensors if n.endswith(".scale")}
    assert linears and all(tensors[f"{m}.weight"].dtype == torch.int8 and tensors[f"{m}.scale"].dtype == torch.float32
                           and tensors[f"{m}.scale"].shape == (tensors[f"{m}.weight"].shape[0], 1) for m in linears)
    # the checkpoint's own module names (q/k/v and gate/up written apart, as LMDeploy fuses them itself)
    assert any(m.endswith("self_attn.q_proj") for m in linears) and not any("qkv" in m for m in linears)
    assert "lm_head.weight" in tensors and tensors["lm_head.weight"].is_floating_point()
    if family == "qwen2_moe":
        # linears we keep float are named in full for LMDeploy's ignored layers (the shared expert's gate); the routers
        # are float in LMDeploy's own Qwen2-MoE (built without a quant config) and are written float
        ignored = quant["modules_to_not_convert"]
        assert ignored and all(tensors[f"{n}.weight"].is_floating_point() for n in ignored)
        assert all(tensors[f"model.layers.{i}.mlp.gate.weight"].is_floating_point() for i in range(2))
        # experts one linear each, under the checkpoint's names (what LMDeploy's fused-MoE loader maps)
        assert "model.layers.0.mlp.experts.3.down_proj.scale" in tensors
        return  # (the numbers: the dense family below; transformers 5 keeps experts stacked, this reader does not)
    assert "modules_to_not_convert" not in quant
    ids = torch.randint(3, 250, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = load_quantized(out)(ids).logits
        theirs = _lmdeploy_reader(folder)(ids).logits
        grids = _rel(_lmdeploy_reader(folder, activations=False)(ids).logits, theirs)
        loaded = load_lmdeploy(folder)(ids).logits  # (the loader benchmarks/serving_formats.py evaluates with)
    assert _rel(theirs, ours) < grids / 2, (_rel(theirs, ours), grids)
    # (the same arithmetic as this test's reader, through transformers' default attention instead of eager: float32
    # order, so at most a tie's code apart)
    assert _rel(loaded, theirs) < grids / 2, (_rel(loaded, theirs), grids)


def test_w4a16_turbomind_folder_is_the_awq_layout_with_its_groups(models, tmp_path):
    """The TurboMind folder is the AWQ export's tensors with LMDeploy's group sizes; loaded by load_lmdeploy (ŵ
    unpacked with its float16 scales) it computes our artefact's logits up to that rounding: each scale moves by at
    most 2⁻¹¹ relative, so the logits by a few 2⁻¹¹ (bound 4·2⁻¹¹), while the quantization itself moves them by more."""
    out = tmp_path / "q"
    _quantize(models["llama"], out, "w4a16", formats="lmdeploy,awq", group=64)
    lmdeploy, awq = safetensors_in(out / "lmdeploy"), safetensors_in(out / "awq")
    assert lmdeploy.keys() == awq.keys() and all(torch.equal(lmdeploy[k], awq[k]) for k in awq)
    quant = json.loads((out / "lmdeploy" / "config.json").read_text())["quantization_config"]
    assert (quant["quant_method"], quant["version"], quant["bits"], quant["group_size"]) == ("awq", "gemm", 4, 64)
    ids = torch.randint(3, 250, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, loaded = load_quantized(out)(ids).logits, load_lmdeploy(out / "lmdeploy")(ids).logits
        plain = AutoModelForCausalLM.from_pretrained(str(models["llama"]), dtype=torch.float32)(ids).logits
    assert _rel(loaded, ours) < 4 * 2.0**-11 < _rel(ours, plain), (_rel(loaded, ours), _rel(ours, plain))
    with pytest.raises(SchemeError, match="groups of 64 or 128"):
        _quantize(models["llama"], tmp_path / "g32", "w4a16", group=32)
    assert not (tmp_path / "g32").exists()


def test_kv_cache_and_static_activations_are_refused_with_what_lmdeploy_does_instead(models, tmp_path):
    with pytest.raises(SchemeError, match="--quant-policy"):
        _quantize(models["llama"], tmp_path / "kv", "w8a8_dynamic", kv_cache="int8")
    with pytest.raises(SchemeError, match="per-token activations"):
        _quantize(models["llama"], tmp_path / "static", "w8a8")
    assert not (tmp_path / "kv").exists() and not (tmp_path / "static").exists()


def test_fp8_is_the_smooth_quant_layout_in_e4m3(models, tmp_path):
    out = tmp_path / "q"
    _quantize(models["llama"], out, "fp8")
    folder = out / "lmdeploy"
    assert json.loads((folder / "config.json").read_text())["quantization_config"]["quant_dtype"] == "float8_e4m3fn"
    tensors = safetensors_in(folder)
    weights = [n for n in tensors if n.endswith(".weight") and f"{n[:-7]}.scale" in tensors]
    assert weights and all(tensors[n].dtype == torch.float8_e4m3fn for n in weights)


@pytest.mark.parametrize(("scheme", "group"), [("w8a8_dynamic", None), ("w4a16", 64)])
def test_ascend_target_writes_the_same_lmdeploy_folder_beside_msmodelslim(models, tmp_path, scheme, group):
    """LMDeploy's PyTorch engine on Ascend (`--device ascend`) loads the smooth_quant W8A8 and AWQ W4A16 folders that
    `lmdeploy lite ... --device npu` writes: --target ascend writes OUT/lmdeploy/ equal, tensor for tensor and in its
    config, to the cuda target's (checked above against LMDeploy's loaders), and OUT/msmodelslim/ as before."""
    cuda, ascend = tmp_path / "cuda", tmp_path / "ascend"
    _quantize(models["llama"], cuda, scheme, group=group)
    _quantize(models["llama"], ascend, scheme, formats="msmodelslim,lmdeploy", group=group, target="ascend")
    a, b = safetensors_in(cuda / "lmdeploy"), safetensors_in(ascend / "lmdeploy")
    assert a and a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (json.loads((cuda / "lmdeploy" / "config.json").read_text())
            == json.loads((ascend / "lmdeploy" / "config.json").read_text()))
    assert (ascend / "msmodelslim" / "quant_model_description.json").is_file()
    with pytest.raises(SchemeError, match="unknown format \\['awq'\\]; formats: msmodelslim, lmdeploy"):
        _quantize(models["llama"], tmp_path / "bad", scheme, formats="awq", group=group, target="ascend")
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("family", ["internlm2", "baichuan", "qwen"])
def test_turbomind_folder_of_a_converted_family_is_its_native_awq_layout(tmp_path, family):
    """InternLM2's packed wqkv, Baichuan's W_pack and Qwen (v1)'s c_attn — the layouts TurboMind converts when it loads
    those families — are read as their native architecture (frontends/conversions.py), so the TurboMind folder is
    that architecture's AWQ folder: config.json names it, q / k / v (and gate / up) are separate AWQ linears, and each
    unpacks (our unpacker of the AutoAWQ gemm layout, from its description) to our artefact's codes exactly, its
    scales to ours in the format's float16."""
    from test_cuda_target import _awq_unpack
    from twin import artefact_layers

    model = make_family_model(tmp_path / family, BY_TYPE[family])
    native = json.loads((model.with_name(model.name + "-native") / "config.json").read_text())
    out = tmp_path / "q"
    _quantize(model, out, "w4a16", group=64)
    folder = out / "lmdeploy"
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == native["architectures"] and config["model_type"] == native["model_type"]
    tensors = safetensors_in(folder)
    assert not [n for n in tensors if any(packed in n for packed in ("wqkv", "W_pack", "c_attn"))]
    layers, _ = artefact_layers(out)
    assert {f"{la.name}.qweight" for la in layers} <= tensors.keys()
    assert {la.name.rsplit(".", 1)[1] for la in layers} >= {"q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"}
    for layer in layers:
        assert layer.codes is not None and layer.scale is not None
        u = _awq_unpack(tensors[f"{layer.name}.qweight"])  # [K, N], unsigned
        z = _awq_unpack(tensors[f"{layer.name}.qzeros"]).repeat_interleave(64, dim=0)
        assert torch.equal((u - z).t(), layer.codes.long()), layer.name
        assert torch.equal(tensors[f"{layer.name}.scales"], layer.scale.t().half()), layer.name


def test_eval_runs_a_serving_folder_as_its_engine_computes_it(models, tmp_path, capsys):
    """`qcompile eval OUT --runtime lmdeploy | compressed-tensors` evaluates the written serving folder instead of our
    artefact, on the same windows. LMDeploy's arithmetic on its folder holds our grids: its perplexity is ours up to
    per-token rounding ties, within a fifth of what the quantization itself moves the perplexity from float's.
    compressed-tensors runs through transformers' own CPU path (whose dynamic activations the support matrix does not
    claim equal to ours: it checks that client's weights); here only that it runs and is reported as such. A folder
    that was not written is one clear error."""
    import math

    from qcompiler.cli import main

    out = tmp_path / "q"
    _quantize(models["llama"], out, "w8a8_dynamic", formats="lmdeploy,compressed-tensors")
    text = tmp_path / "eval.txt"
    text.write_text(TEXT)
    ppl, float_ppl = {}, None
    for runtime in ("reference", "lmdeploy", "compressed-tensors"):
        assert main(["eval", str(out), "--text", str(text), "--seq-len", "64", "--runtime", runtime, "--json",
                     *(["--no-float-cache"] if runtime == "reference" else ["--no-float"])]) == 0
        result = json.loads(capsys.readouterr().out)
        assert result["runtime"] == runtime
        ppl[runtime] = result["quantized"]["perplexity"]
        float_ppl = result.get("float", {}).get("perplexity", float_ppl)
    assert float_ppl is not None
    effect = abs(ppl["reference"] / float_ppl - 1)
    assert abs(ppl["lmdeploy"] / ppl["reference"] - 1) < effect / 5, (ppl, float_ppl)
    assert math.isfinite(ppl["compressed-tensors"])
    assert main(["eval", str(out), "--text", str(text), "--runtime", "msmodelslim", "--no-float"]) == 2
    assert "has no msmodelslim/ folder" in capsys.readouterr().err
