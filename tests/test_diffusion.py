"""Diffusion transformers (issue 16): SD3, FLUX, Wan 2.1 and HunyuanVideo transformers quantized block by block from tiny configs, reloaded
into diffusers' own class, and checked against diffusers' model computing what the artefact states.

Tiny configs keep the published models' structure and shrink the sizes:
- FLUX: black-forest-labs/FLUX.1-dev's FluxTransformer2DModel (double- then single-stream blocks, guidance embedding,
  3-axis rotary split (16, 56, 56) here (4, 6, 6), patch 1 on packed latents), 2 + 2 blocks, 4 heads of 16.
- SD3: stabilityai/stable-diffusion-3-medium-diffusers' SD3Transformer2DModel (joint blocks, the last one
  context-pre-only, patch 2, caption projection), 2 blocks, 4 heads of 16.
- Wan: Wan-AI/Wan2.1-T2V-1.3B-Diffusers' WanTransformer3DModel (video latents patched (1, 2, 2), q/k RMSNorm across
  heads, cross-attention to the text, 3-D rotary), 2 blocks, 4 heads of 16.
- HunyuanVideo: hunyuanvideo-community/HunyuanVideo's HunyuanVideoTransformer3DModel (dual- then single-stream
  blocks, token refiner, masked text of unequal lengths, 3-axis rotary, guidance embedding), 2 + 2 blocks, 2 heads of
  16. Its blocks are called with the first frame's token count, which they do not read: the trace leaves it out, so
  the artefact runs at other resolutions.

The oracle (`_twin`) is diffusers' float model with every quantized layer's dequantized weight ŵ = q·s read from the
artefact's files (tests/twin.py's reading) and, for quantized activations, the input grid applied in a pre-hook. It
runs none of our graphs or kernels. Tolerance, weight-only: the same float32 numbers in another order, |Δ|/|y| ≤ 2e-5
(measured ~1e-7); the quantization itself moves these outputs by ≥ 1e-4, asserted so that the check can fail. With
quantized activations two float32 computations can put a value on the other side of a rounding tie and move one code
by one step (tests/test_support_matrix.py's argument): the error must stay under half of what the activation grids
themselves change (the twin without its hooks), which a missing or wrong grid exceeds.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from twin import with_artefact_layers

from qcompiler.driver.config import QuantizeConfig
from qcompiler.driver.diffusers import quantize_dit
from qcompiler.driver.plan import plan_run
from qcompiler.errors import ModelLoadError, PipelineError, SchemeError
from qcompiler.frontends.diffusers import example_inputs, load_dit, model_timestep, sample
from qcompiler.runtime import load_quantized
from qcompiler.schemes import get_scheme

CONFIGS = {
    "flux": ("FluxTransformer2DModel", dict(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2,
                                            attention_head_dim=16, num_attention_heads=4, joint_attention_dim=32,
                                            pooled_projection_dim=32, axes_dims_rope=(4, 6, 6), guidance_embeds=True)),
    "wan": ("WanTransformer3DModel", dict(patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=16,
                                          in_channels=4, out_channels=4, text_dim=32, freq_dim=32, ffn_dim=128,
                                          num_layers=2, rope_max_seq_len=64)),
    "sd3": ("SD3Transformer2DModel", dict(sample_size=16, patch_size=2, in_channels=4, num_layers=2,
                                          attention_head_dim=16, num_attention_heads=4, joint_attention_dim=32,
                                          caption_projection_dim=64, pooled_projection_dim=32, out_channels=4,
                                          pos_embed_max_size=32)),
    # tencent/HunyuanVideo (diffusers): dual- then single-stream blocks, a token refiner, a text mask, 3D rotary
    "hunyuan": ("HunyuanVideoTransformer3DModel", dict(in_channels=4, out_channels=4, num_attention_heads=2,
                                                       attention_head_dim=16, num_layers=2, num_single_layers=2,
                                                       num_refiner_layers=1, patch_size=2, patch_size_t=1,
                                                       text_embed_dim=32, pooled_projection_dim=32,
                                                       rope_axes_dim=(4, 6, 6), guidance_embeds=True)),
}


@pytest.fixture(scope="module")
def dit_models(tmp_path_factory) -> dict[str, Path]:
    import diffusers

    root = tmp_path_factory.mktemp("dit")
    out = {}
    for kind, (cls, cfg) in CONFIGS.items():
        torch.manual_seed(0)
        model = getattr(diffusers, cls)(**cfg)
        with torch.no_grad():  # (diffusers zero-initialises some output projections: give every weight a value)
            for p in model.parameters():
                p.normal_(0, 0.05) if p.dim() >= 2 else p.add_(torch.randn_like(p) * 0.02)
        model.save_pretrained(str(root / kind))
        out[kind] = root / kind
    return out


def _load(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def _quantize(model: Path, out: Path, scheme: str, algo: str = "rtn", target: str = "reference") -> dict:
    cfg = QuantizeConfig(model=model, scheme=get_scheme(scheme, group_size=32 if scheme == "w4a16" else None), out=out,
                         algo=algo, target=target, num_samples=8, seq_len=64, progress=False)
    return quantize_dit(cfg, plan_run(cfg), log=lambda _: None)


def _twin(source: Path, out: Path, activations: bool = True) -> torch.nn.Module:
    return with_artefact_layers(load_dit(source), out, activations)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _median_token_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """The median over tokens of |a − b| / |b| (per position over the channels for video outputs [B, C, F, H, W])."""
    a, b = (t.movedim(1, -1) if t.dim() > 3 else t for t in (a, b))
    return float(((a - b).norm(dim=-1) / b.norm(dim=-1)).median())


def _block_prefixes(out: Path) -> tuple[str, ...]:
    return tuple(f"{n}." for n in json.loads((out / "qcompiler.json").read_text())["blocks"]["names"])


def _onnxruntime_runs(out: Path, model: torch.nn.Module) -> Iterator[tuple[dict[str, torch.Tensor], torch.Tensor]]:
    """OUT/model.onnx run by onnxruntime at two shapes other than the export's (batch 3 and 1, 6² and 4² latent
    patches, 9 and 12 text tokens): (the inputs, its output) each."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(out / "model.onnx"))
    for seed, batch, side, text in ((11, 3, 6, 9), (12, 1, 4, 12)):
        inputs = {**example_inputs(model, batch, torch.Generator().manual_seed(seed), latent_side=side,
                                   text_tokens=text),
                  "timestep": model_timestep(model, torch.tensor(300.0), batch)}
        got = session.run(None, {i.name: inputs[i.name].numpy() for i in session.get_inputs()})[0]
        yield inputs, torch.from_numpy(got)


@pytest.mark.parametrize(("kind", "scheme", "algo"), [("flux", "w8a16", "rtn"), ("flux", "w8a8_dynamic", "rtn"),
                                                      ("flux", "w4a16", "gptq"), ("sd3", "w8a16", "rtn"),
                                                      ("sd3", "w8a8_dynamic", "rtn"), ("wan", "w8a8_dynamic", "rtn"),
                                                      ("hunyuan", "w8a16", "rtn"), ("hunyuan", "w8a8_dynamic", "rtn")])
def test_quantized_dit_equals_diffusers_model_with_the_artefact_weights(dit_models, tmp_path, kind, scheme, algo):
    source, out = dit_models[kind], tmp_path / "q"
    desc = _quantize(source, out, scheme, algo)
    layers = desc["layers"]
    # every linear of every block is quantized (attention, MLP, adaLN modulation), nothing outside the blocks
    assert layers and all(p.startswith(("transformer_blocks.", "single_transformer_blocks.", "blocks.")) for p in layers)
    assert all(r["output_sqnr_db"] > 20 for r in desc["block_report"].values())
    quantized, twin, float_ = load_quantized(out), _twin(source, out), load_dit(source)
    acts = any(r.get("activations") for r in layers.values())
    act_free = _twin(source, out, activations=False) if acts else None
    assert type(quantized).__name__ == CONFIGS[kind][0]
    # other sizes than calibration's (8² latent patches, 12 text tokens, 2 latents): the blocks are shape-dynamic
    for batch, side, text in ((3, 5, 7), (1, 8, 12)):
        inputs = {**example_inputs(float_, batch, torch.Generator().manual_seed(side), latent_side=side, text_tokens=text),
                  "timestep": model_timestep(float_, torch.tensor(700.0), batch)}
        with torch.no_grad():
            got, expect, plain = (m(**inputs, return_dict=False)[0] for m in (quantized, twin, float_))
            grids = _rel(act_free(**inputs, return_dict=False)[0], expect) if act_free is not None else None
        if grids is None:
            assert _rel(got, expect) < 2e-5, (batch, side)
        else:  # a code flipped at a rounding tie moves far less than the grids themselves move the output
            assert _rel(got, expect) < grids / 2, (batch, side, grids)
        assert _rel(got, plain) > 1e-4  # (the check above can fail: quantization moves the output)


def test_calibration_follows_a_sampling_trajectory_and_eval_reports_it(dit_models, tmp_path, capsys):
    """The calibration inputs are the model's own sampling run (timesteps descending, each step's latents moved by
    the model's prediction); `qcompile eval` compares the quantized transformer with the float one inside one."""
    from qcompiler.cli import main

    model = load_dit(dit_models["flux"])
    steps, final = sample(model, 4, 2, seed=0, latent_side=4)
    times = [float(s["timestep"][0]) for s in steps]
    assert times == sorted(times, reverse=True) and len(set(times)) == 4
    assert not torch.equal(steps[0]["hidden_states"], steps[1]["hidden_states"])
    assert torch.isfinite(final).all() and not torch.equal(final, steps[-1]["hidden_states"])
    out = tmp_path / "q"
    assert main(["quant", "--model", str(dit_models["flux"]), "--scheme", "w8a16", "--out", str(out),
                 "--num-samples", "4", "--seq-len", "16", "--no-progress"]) == 0
    desc = json.loads((out / "qcompiler.json").read_text())
    assert desc["calibration"]["sampling_steps"] == 2 and desc["frontend"] == "diffusers"
    capsys.readouterr()
    assert main(["eval", str(out), "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["kind"] == "diffusion" and len(r["step_sqnr_db"]) == r["sampling"]["steps"]
    # int8 weights on a tiny random model: every step's prediction within ~40 dB, the final latents within ~60
    assert min(r["step_sqnr_db"]) > 30 and r["final_latent_psnr_db"] > 40 and r["final_latent_cosine"] > 0.999


@pytest.mark.parametrize(("kind", "scheme"), [("flux", "w8a8"), ("flux", "w8a8_dynamic"), ("sd3", "w8a16"),
                                               ("wan", "w8a8"), ("hunyuan", "w8a8")])
def test_ascend_target_writes_msmodelslim_layout_that_runs_as_our_artefact(dit_models, tmp_path, kind, scheme):
    """--target ascend: OUT/msmodelslim/ holds every quantized linear of both block lists in msModelSlim's ascend v1
    layout under the transformer's module names, everything else FLOAT; built by the diffusers class and run as the
    NPU call sequences (emulated), it computes what our artefact computes."""
    from qcompiler.runtime.msmodelslim import load_msmodelslim, read_folder

    source, out = dit_models[kind], tmp_path / "q"
    blocks = _quantize(source, out, scheme, target="ascend")["blocks"]["names"]
    desc, tensors = read_folder(out / "msmodelslim")
    kind_of = {"w8a8": "W8A8", "w8a8_dynamic": "W8A8_DYNAMIC", "w8a16": "W8A16"}[scheme]
    quantized = {n.removesuffix(".weight") for n, t in desc.items() if n.endswith(".weight") and t == kind_of}
    float_model = load_dit(source)
    inside = tuple(f"{n}." for n in blocks)
    # every linear of every block (fused q/k/v written back as the model's own three), nothing else
    assert quantized == {n for n, m in float_model.named_modules()
                         if isinstance(m, torch.nn.Linear) and n.startswith(inside)}
    # everything outside the blocks (embedders, final norm / projection) is written, float and unchanged
    outer = {n: p for n, p in float_model.named_parameters() if not n.startswith(inside)}
    assert outer and all(desc[n] == "FLOAT" and torch.equal(tensors[n].float(), p) for n, p in outer.items())
    assert not [n for n in tensors if tensors[n].dtype == torch.int8 and desc[n] == "FLOAT"]
    npu, ours = load_msmodelslim(out / "msmodelslim"), load_quantized(out)
    inputs = {**example_inputs(float_model, 2, torch.Generator().manual_seed(3), latent_side=6, text_tokens=9),
              "timestep": model_timestep(float_model, torch.tensor(500.0), 2)}
    with torch.no_grad():
        got, expect, plain = (m(**inputs, return_dict=False)[0] for m in (npu, ours, float_model))
        act_free = _twin(source, out, activations=False)(**inputs, return_dict=False)[0] if scheme != "w8a16" else None
    assert _rel(expect, plain) > 1e-4  # (quantization moves the output: the checks below can fail)
    if act_free is None:  # weight-only: the same numbers up to float32 summation order
        assert _rel(got, expect) < 1e-5, _rel(got, expect)
    else:  # int8 activations: two correct implementations differ only where an input sits on a rounding tie of its
        # grid; on the typical token they agree far better than either agrees with the model without activation
        # quantization (a wrong scale, zero point or bias moves every token)
        err, budget = _median_token_error(got, expect), _median_token_error(act_free, expect)
        assert err < 0.5 * budget, (err, budget)


@pytest.mark.parametrize("kind", ["flux", "hunyuan"])
def test_ascend_target_writes_quantized_attention_as_fa_quant_scales(dit_models, tmp_path, kind):
    """Quantized attention on --target ascend: every block attention's Q, K and V grids as MindIE's FAQuant tensors
    (<attn>.fa_q.scale / .offset [heads, head_dim], type FAQuant, global fa_quant_type), equal to our artefact's
    grids (offset = the signed zero point); the folder loaded by our msModelSlim loader (linears as NPU calls, Q / K
    / V fake-quantized into SDPA) computes what our artefact computes. Weight-only linears with an asymmetric
    attention grid, so that nothing but the float32 summation order may differ (|Δ|/|y| ≤ 1e-5, measured ~2e-7)
    and the offsets are not zero; the attention grids themselves move the output by ≥ 1e-4 (asserted)."""
    from qcompiler.runtime.msmodelslim import load_msmodelslim, read_folder

    source, out = dit_models[kind], tmp_path / "q"
    cfg = QuantizeConfig(model=source, scheme=get_scheme("w8a16", kv_cache="int8-asym"), out=out, target="ascend",
                         num_samples=8, seq_len=64, progress=False)
    qdesc = quantize_dit(cfg, plan_run(cfg), log=lambda _: None)
    desc, tensors = read_folder(out / "msmodelslim")
    ours_tensors = {k: v for f in out.glob("*.safetensors") for k, v in _load(f).items()}
    assert desc["fa_quant_type"] == "FAQuant" and "kv_quant_type" not in desc
    fa = {n for n, t in desc.items() if t == "FAQuant" and n != "fa_quant_type"}
    records = [r for recs in qdesc["kv_cache"].values() for r in recs]
    assert len(fa) == 2 * len(records) == 2 * 3 * len(qdesc["blocks"]["names"])
    for r in records:
        base = r["tensors"]["scale"].removesuffix(f"{r['kind']}_cache_scale") + f"fa_{r['kind']}."
        scale, offset = tensors[base + "scale"], tensors[base + "offset"]
        assert scale.shape == offset.shape == (r["heads"], r["head_dim"]) and scale.dtype == torch.float32
        assert torch.equal(scale, ours_tensors[r["tensors"]["scale"]].reshape(scale.shape))
        assert torch.equal(offset, ours_tensors[r["tensors"]["zero"]].reshape(scale.shape) - 128)
        assert offset.abs().sum() > 0 or r["kind"] != "v"  # (Q and K: rotary pairs share a symmetric range)
    npu, ours = load_msmodelslim(out / "msmodelslim"), load_quantized(out)
    inputs = {**example_inputs(ours, 2, torch.Generator().manual_seed(3), latent_side=6, text_tokens=9),
              "timestep": model_timestep(ours, torch.tensor(500.0), 2)}
    with torch.no_grad():
        got, expect = (m(**inputs, return_dict=False)[0] for m in (npu, ours))
        for name in {n.rsplit(".", 2)[0] for n in fa}:  # the same folder without its attention grids
            npu.get_submodule(name)._forward_pre_hooks.clear()
            npu.get_submodule(name)._forward_hooks.clear()
        without_fa = npu(**inputs, return_dict=False)[0]
    assert _rel(without_fa, expect) > 1e-4
    assert _rel(got, expect) < 1e-5, _rel(got, expect)


def test_timestep_groups_fit_and_switch_static_activation_grids(dit_models, tmp_path):
    """--timestep-groups 2 (FLUX, static w8a8): every static activation grid is fitted again on each half of the
    sampling run (early: high t, late), recorded per group with the timestep between them; the graph keeps the
    all-steps grid, which for symmetric min-max grids is the widest group's (the range over all steps is the widest
    group range). Reloaded, the model at a timestep of group g computes what the artefact with group g's grids
    written into its files computes (diffusers' model with those grids, tests/twin.py), rounding ties aside; other
    targets and schemes without static grids are refused by name."""
    import shutil

    from safetensors.torch import save_file

    source, out = dit_models["flux"], tmp_path / "q"
    cfg = QuantizeConfig(model=source, scheme=get_scheme("w8a8"), out=out, num_samples=8, seq_len=64,
                         progress=False, timestep_groups=2)
    desc = quantize_dit(cfg, plan_run(cfg), log=lambda _: None)
    section = desc["timestep_groups"]
    static = {r["tensors"]["input_scale"] for r in desc["layers"].values()
              if r["activations"] and not r["activations"]["dynamic"]}
    assert set(section["grids"]) == static and len(section["bounds"]) == 1
    files = {k: v for f in out.glob("*.safetensors") for k, v in _load(f).items()}
    assert all(float(files[name]) == max(values) for name, values in section["grids"].items())
    assert any(values[0] != values[1] for values in section["grids"].values())
    ours = load_quantized(out)
    for group, t in enumerate((900.0, 100.0)):  # (FLUX takes t / 1000: 0.9 and 0.1 lie either side of the bound)
        copy = tmp_path / f"group{group}"
        shutil.copytree(out, copy)
        for f in copy.glob("block-*.safetensors"):
            tensors = _load(f)
            tensors.update({k: torch.tensor(section["grids"][k][group], dtype=v.dtype).reshape(v.shape)
                            for k, v in tensors.items() if k in section["grids"]})
            save_file(tensors, str(f), metadata={"format": "pt"})
        inputs = {**example_inputs(ours, 2, torch.Generator().manual_seed(5), latent_side=6, text_tokens=9),
                  "timestep": model_timestep(ours, torch.tensor(t), 2)}
        with torch.no_grad():
            got = ours(**inputs, return_dict=False)[0]
            expect = _twin(source, copy)(**inputs, return_dict=False)[0]
            act_free = _twin(source, copy, activations=False)(**inputs, return_dict=False)[0]

        err, budget = _median_token_error(got, expect), _median_token_error(act_free, expect)
        assert err < 0.5 * budget, (group, err, budget)
    for target, scheme, groups, reason in [("ascend", "w8a8", 2, "one activation grid per layer"),
                                           ("reference", "w8a8_dynamic", 2, "no static activation grid"),
                                           ("reference", "w8a8", 5, "at most 4 groups")]:
        bad = QuantizeConfig(model=source, scheme=get_scheme(scheme), out=tmp_path / "bad", target=target,
                             num_samples=8, seq_len=64, progress=False, timestep_groups=groups)
        with pytest.raises(SchemeError, match=reason):
            quantize_dit(bad, plan_run(bad), log=lambda _: None)
        assert not (tmp_path / "bad").exists()


def test_dit_refusals_name_what_is_missing(dit_models, tmp_path):
    out = tmp_path / "q"
    with pytest.raises(SchemeError, match="diffusion transformers are written for --target reference, ascend, onnxruntime"):
        _quantize(dit_models["sd3"], out, "w8a8", target="cuda")
    assert not out.exists()
    from qcompiler.pm.pipeline import parse_pipeline

    cfg = QuantizeConfig(model=dit_models["sd3"], scheme=get_scheme("w4a16"), out=out, progress=False,
                         passes=parse_pipeline("rotate,gptq"))
    with pytest.raises(PipelineError, match=r"passes \['rotate'\] change weights outside the blocks"):
        quantize_dit(cfg, plan_run(cfg), log=lambda _: None)
    assert not out.exists()
    other = tmp_path / "unet"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel", "_diffusers_version": "0.42.1"}))
    with pytest.raises(ModelLoadError, match="'UNet2DConditionModel' is not supported"):
        _quantize(other, out, "w8a16")
    assert not out.exists()
    i2v = json.loads((dit_models["hunyuan"] / "config.json").read_text()) | {"image_condition_type": "token_replace"}
    (other / "config.json").write_text(json.dumps(i2v))
    with pytest.raises(ModelLoadError, match="image-to-video variant .* is not supported"):
        _quantize(other, out, "w8a16")
    assert not out.exists()


@pytest.mark.parametrize("kind", ["flux", "hunyuan"])
def test_w8a8c8_quantizes_every_attention_query_key_and_value_as_recorded(dit_models, tmp_path, monkeypatch, kind):
    """w8a8c8 on a DiT is quantized attention (msModelSlim's FA3): Q, K and V of every block's attention pass a static
    int8 per-channel grid, recorded per block and applied again on reload. Oracle: the twin with torch's SDPA wrapped
    to fake-quantize its query, key and value with the recorded scales, x̂ = (clamp(round(x/s) + z, qmin, qmax) − z)·s,
    the i-th call with block i's grid."""
    from safetensors.torch import load_file

    source, out = dit_models[kind], tmp_path / "q"
    desc = _quantize(source, out, "w8a8c8")
    kv = desc["kv_cache"]
    assert list(kv) == desc["blocks"]["names"]
    assert all([r["kind"] for r in recs] == ["q", "k", "v"] for recs in kv.values())
    tensors: dict[str, torch.Tensor] = {}
    for f in out.glob("*.safetensors"):
        tensors.update(load_file(str(f)))
    grids = [{r["kind"]: (tensors[r["tensors"]["scale"]], tensors[r["tensors"]["zero"]], r["qmin"], r["qmax"])
              for r in kv[name]} for name in desc["blocks"]["names"]]
    sdpa = torch.nn.functional.scaled_dot_product_attention
    calls = []
    outer = CONFIGS[kind][1].get("num_refiner_layers", 0)  # (HunyuanVideo's token refiner attends first, float)

    def quantized_sdpa(query, key, value, *args, **kwargs):
        calls.append(1)
        if len(calls) <= outer:
            return sdpa(query, key, value, *args, **kwargs)
        grid = grids[len(calls) - outer - 1]
        fq = (lambda x, g: (torch.clamp(torch.round(x / g[0]) + g[1], g[2], g[3]) - g[1]) * g[0])  # noqa: E731
        return sdpa(fq(query, grid["q"]), fq(key, grid["k"]), fq(value, grid["v"]), *args, **kwargs)

    quantized, twin = load_quantized(out), _twin(source, out)
    inputs = {**example_inputs(twin, 2, torch.Generator().manual_seed(3), latent_side=6, text_tokens=9),
              "timestep": model_timestep(twin, torch.tensor(400.0), 2)}
    with torch.no_grad():
        got = quantized(**inputs, return_dict=False)[0]
        without_kv = twin(**inputs, return_dict=False)[0]
        monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", quantized_sdpa)
        expect = twin(**inputs, return_dict=False)[0]
    assert len(calls) == outer + len(grids)  # (one attention per block, in block order)
    # Rounding ties aside, equal: an activation at a tie may take the neighbouring code (CPU-dependent last-ulp
    # differences, measured up to a sixth of the Q/K/V grids' own effect); a dropped or wrong grid moves the
    # output by at least what the grids move it.
    assert _rel(got, expect) < _rel(without_kv, expect) / 2


@pytest.mark.parametrize("kind", ["flux", "hunyuan"])
def test_onnxruntime_target_writes_a_qdq_model_that_onnxruntime_runs_as_our_artefact(dit_models, tmp_path, kind):
    """--target onnxruntime on a DiT (static W8A8): OUT/model.onnx, the diffusers transformer with every quantized
    linear as QuantizeLinear → DequantizeLinear(8-bit codes) → GEMM, run by onnxruntime with its default
    optimizations, computes what our artefact computes (activation codes may differ at rounding ties: the same
    budget as the other static-activation checks) at other batch sizes, resolutions and text lengths than the
    export's (every input dimension symbolic; HunyuanVideo's boolean text mask included); w8a16 and per-token schemes
    are refused by name."""
    import onnx

    source, out = dit_models[kind], tmp_path / "q"
    _quantize(source, out, "w8a8", target="onnxruntime")
    proto = onnx.load(str(out / "model.onnx"))
    ops = [n.op_type for n in proto.graph.node]
    # 8-bit codes unsigned (q + 128, zero point 128): onnxruntime's u8×s8 kernels saturate without VNNI
    codes = [i for i in proto.graph.initializer if i.data_type == onnx.TensorProto.UINT8 and len(i.dims) == 2]
    assert not [i.name for i in proto.graph.initializer if i.data_type == onnx.TensorProto.INT8]
    ours, float_model = load_quantized(out), load_dit(source)
    blocks = _block_prefixes(out)
    linears = [n for n, m in float_model.named_modules() if isinstance(m, torch.nn.Linear) and n.startswith(blocks)]
    # every block linear's weight is stored as 8-bit codes (no float copy), its input passes a QuantizeLinear
    assert len(codes) == len(linears) and ops.count("DequantizeLinear") >= len(linears)
    assert ops.count("QuantizeLinear") > 0 and not any(i.data_type == onnx.TensorProto.FLOAT and tuple(i.dims) ==
                                                       tuple(float_model.get_submodule(linears[0]).weight.shape)
                                                       and i.name.endswith("w_hat") for i in proto.graph.initializer)
    assert all(i.type.tensor_type.shape.dim[0].dim_param for i in proto.graph.input if i.name != "txt_ids")
    for inputs, got in _onnxruntime_runs(out, float_model):
        with torch.no_grad():
            expect = ours(**inputs, return_dict=False)[0]
            act_free = _twin(source, out, activations=False)(**inputs, return_dict=False)[0]
        assert got.shape == expect.shape
        err, budget = _median_token_error(got, expect), _median_token_error(act_free, expect)
        assert err < 0.5 * budget, (list(got.shape), err, budget)
    if kind != "flux":
        return
    with pytest.raises(SchemeError, match="one activation scale per tensor"):
        _quantize(source, tmp_path / "dyn", "w8a8_dynamic", target="onnxruntime")
    assert not (tmp_path / "dyn").exists()


@pytest.mark.parametrize(("kind", "scheme"), [("flux", "w8a16"), ("flux", "w4a16"), ("flux", "w4a16-asym"),
                                            ("sd3", "w8a16"), ("wan", "w4a16")])
def test_onnxruntime_target_writes_weight_only_layers_as_matmulnbits(dit_models, tmp_path, kind, scheme):
    """Weight-only schemes on --target onnxruntime: every block linear of the DiT is onnxruntime's MatMulNBits
    (int8 per channel, int4 in groups of 32; no float copy of the weight in the file), accuracy_level 0, which
    computes x·ŵᵀ + b in float32: onnxruntime's output equals our artefact's up to summation order (|Δ|/|y| ≤ 1e-5)
    at two shapes other than the export's, while the quantization itself moves it by ≥ 1e-4 (FLUX, SD3, Wan)."""
    import onnx

    source, out = dit_models[kind], tmp_path / "q"
    if scheme.endswith("-asym"):  # (zero points: MatMulNBits' zero_points input)
        cfg = QuantizeConfig(model=source, scheme=get_scheme("w4a16", group_size=32, symmetric=False), out=out,
                             target="onnxruntime", num_samples=8, seq_len=64, progress=False)
        quantize_dit(cfg, plan_run(cfg), log=lambda _: None)
    else:
        _quantize(source, out, scheme, target="onnxruntime")
    proto = onnx.load(str(out / "model.onnx"))
    nbits = [n for n in proto.graph.node if n.op_type == "MatMulNBits"]
    assert all(len(n.input) > 3 and n.input[3] for n in nbits) == scheme.endswith("-asym")
    ours, float_model = load_quantized(out), load_dit(source)
    blocks = _block_prefixes(out)
    linears = {n: m for n, m in float_model.named_modules() if isinstance(m, torch.nn.Linear) and n.startswith(blocks)}
    assert len(nbits) == len(linears) and "DequantizeLinear" not in {n.op_type for n in proto.graph.node}
    assert {a.i for n in nbits for a in n.attribute if a.name == "bits"} == {int(scheme[1])}
    assert {a.i for n in nbits for a in n.attribute if a.name == "accuracy_level"} == {0}
    assert not [i.name for i in proto.graph.initializer if i.data_type == onnx.TensorProto.FLOAT and len(i.dims) == 2
                and i.name.removeprefix("model.").startswith(blocks)]  # (the blocks' weights: codes only)
    for inputs, got in _onnxruntime_runs(out, float_model):
        with torch.no_grad():
            expect = ours(**inputs, return_dict=False)[0]
            plain = float_model(**inputs, return_dict=False)[0]
        assert _rel(expect, plain) > 1e-4
        assert _rel(got, expect) < 1e-5, _rel(got, expect)
