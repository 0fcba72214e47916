"""kv_quant: KV-cache quantization at the cache points of GQA, sliding-window, per-head-norm and MLA attention;
its maths, its runtime rebuild, and its exports (onnxruntime's quantized GroupQueryAttention cache, msModelSlim
C8, compressed-tensors kv_cache_scheme read by transformers)."""

import json

import numpy as np
import pytest
import torch
from blocks import context, rel_err, run, traced_block
from safetensors import safe_open
from tiny import byte_tokenizer, make_tiny_model

import qcompiler.kernels  # noqa: F401
from qcompiler.driver import QuantizeConfig, quantize
from qcompiler.errors import ModelLoadError, PassError, SchemeError
from qcompiler.ir import qmeta
from qcompiler.ir.graph import copy_graph, get_tensor
from qcompiler.ir.kv_cache import cache_points
from qcompiler.kernels import reference
from qcompiler.pm.manager import PassManager
from qcompiler.pm.pipeline import parse_pipeline
from qcompiler.runtime import load_quantized
from qcompiler.schemes import QuantArgs, QuantScheme, get_scheme, parse_kv_cache

FQ = {torch.ops.qc.fake_quant_kv.default, torch.ops.qc.fake_quant_kv_dynamic.default}


def _quantize(model, out, scheme, text, target="reference", **kw):
    cfg = QuantizeConfig(model=model, scheme=scheme, out=out, target=target, calib_texts=[text], num_samples=4,
                         seq_len=48, batch_size=2, progress=False, **kw)
    return quantize(cfg, log=lambda s: None)


def _kv_pass(gm, inputs, kv):
    ctx = context(inputs, get_scheme("w8a16", kv_cache=kv))
    return PassManager(parse_pipeline("kv_quant")).run(gm, ctx), ctx


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_models):
    root = tmp_path_factory.mktemp("kv")
    return {**tiny_models,
            "mistral_window": make_tiny_model(root / "mw", "mistral", sliding_window=8),
            "deepseek_v3": make_tiny_model(root / "ds", "deepseek_v3"),
            "ort": make_tiny_model(root / "ort", "llama", head_dim=32, hidden_size=128),
            # eager attention (soft-capping): softmax(q·kᵀ)·v written out as matmuls
            "gemma2": make_tiny_model(root / "g2", "gemma2", hidden_activation="gelu_pytorch_tanh", sliding_window=8,
                                      query_pre_attn_scalar=24)}


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma", "mistral_window", "gemma2"])
def test_cache_points_are_k_after_rope_and_v_before_gqa_repetition(models, family):
    gm, inputs = traced_block(models[family])
    if family == "gemma2":  # (eager: the points are found from the matmuls' operands, Kᵀ walked back through)
        assert not any("scaled_dot_product" in str(n.target) for n in gm.graph.nodes)
    points = cache_points(gm)
    assert [p.kind for p in points] == ["k", "v"]
    k, v = (p.node for p in points)
    # K is the rotary add (after Qwen3's per-head k norm), V the head transpose of v_proj, both with the 2 KV
    # heads of the GQA config (4 query heads): quantizing there is quantizing what the cache stores
    assert str(k.target) == "aten.add.Tensor"
    assert k.meta["val"].shape[1] == 2 and v.meta["val"].shape[1] == 2
    gm, ctx = _kv_pass(gm, inputs, "int8-head")
    fqs = [n for n in gm.graph.nodes if n.target in FQ]
    assert len(fqs) == 2 and {n.meta[qmeta.KV_FQ]["kind"] for n in fqs} == {"k", "v"}
    assert all(list(n.users) and all(u.target not in FQ for u in n.users) for n in fqs)
    scale = get_tensor(gm, fqs[0].meta[qmeta.KV_FQ]["scale"])
    assert scale.shape == (1, 2, 1, 1)  # per KV head
    assert ctx.report["kv_quant"]["cache"] == ["self_attn.k", "self_attn.v"]


def test_mla_caches_the_latent_and_the_shared_rotary_key(models):
    gm, inputs = traced_block(models["deepseek_v3"], index=0)
    points = cache_points(gm)
    assert [p.kind for p in points] == ["kv_latent", "k_rope"]
    latent, rope = (p.node.meta["val"].shape for p in points)
    assert latent[1] == 1 and latent[3] == 32 and rope[1] == 1 and rope[3] == 16  # kv_lora_rank, qk_rope_head_dim
    ref = run(gm, inputs)
    gm, _ = _kv_pass(gm, inputs, "int8-channel")
    assert 0 < rel_err(run(gm, inputs), ref) < 0.05


@pytest.mark.parametrize("spec", ["int8-tensor", "int8-head", "int8-channel", "int8-head-asym", "int4-channel-asym"])
def test_static_kv_codes_stay_on_the_grid_within_half_a_step(models, spec):
    """Every calibration value lies inside the observed range, so X̂ is X rounded to its grid: |X̂ − X| ≤ s/2."""
    gm, inputs = traced_block(models["llama"])
    float_gm = copy_graph(gm)
    values = {}

    class Keep(torch.fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            values[n.name] = out
            return out

    args = parse_kv_cache(spec)
    gm, _ = _kv_pass(gm, inputs, spec)
    for fq in (n for n in gm.graph.nodes if n.target in FQ):
        info = fq.meta[qmeta.KV_FQ]
        scale, zero = get_tensor(gm, info["scale"]), get_tensor(gm, info["zero"])
        for batch in inputs:
            Keep(float_gm).run(*batch)
            x = values[fq.args[0].name]
            q = reference.quantize_kv_static(x, scale, zero, args.qmin, args.qmax)
            assert q.min() >= args.qmin and q.max() <= args.qmax and torch.equal(q, q.round())
            x_hat = reference.fake_quant_kv(x, scale, zero, args.qmin, args.qmax)
            assert ((x_hat - x).abs() <= scale / 2 + 1e-6).all()


def test_dynamic_kv_is_per_token_and_head(models):
    gm, inputs = traced_block(models["llama"])
    x = torch.randn(2, 3, 5, 16) * torch.linspace(0.1, 10, 5)[None, None, :, None]
    for symmetric in (True, False):
        q, s, z = reference.quantize_kv_dynamic(x, 4, symmetric)
        assert s.shape == (2, 3, 5, 1)  # one scale per (batch, head, token)
        assert ((reference.fake_quant_kv_dynamic(x, 4, symmetric) - x).abs() <= s / 2 + 1e-6).all()
    ref = run(gm, inputs)
    gm, _ = _kv_pass(gm, inputs, "int8-token")
    assert [n.target for n in gm.graph.nodes if n.target in FQ] == [torch.ops.qc.fake_quant_kv_dynamic.default] * 2
    assert 0 < rel_err(run(gm, inputs), ref) < 0.02


def test_kv_quant_refuses_a_scheme_without_kv_cache_and_bad_specs(models):
    gm, inputs = traced_block(models["llama"])
    with pytest.raises(SchemeError, match="no kv_cache"):
        PassManager(parse_pipeline("kv_quant")).run(gm, context(inputs, "w8a16"))
    for bad in ("int3", "int8-row", "fp8"):
        with pytest.raises(SchemeError):
            parse_kv_cache(bad)
    with pytest.raises(SchemeError, match="dynamic exactly when per token"):
        QuantScheme("x", QuantArgs(), kv_cache=QuantArgs(bits=8, granularity="head", dynamic=True))
    with pytest.raises(SchemeError, match="per head"):
        QuantScheme("x", QuantArgs(granularity="head"))
    assert parse_kv_cache("none") is None


@pytest.mark.slow
def test_artefact_reloads_its_kv_quantization(models, tmp_path, calib_text):
    out = tmp_path / "o"
    desc = _quantize(models["llama"], out, get_scheme("w8a16", kv_cache="int4-head-asym"), calib_text)
    assert set(desc["kv_cache"]) == {"model.layers.0", "model.layers.1"}
    rec = desc["kv_cache"]["model.layers.0"][0]
    assert rec["args"]["bits"] == 4 and not rec["args"]["symmetric"] and rec["heads"] == 2
    plain = tmp_path / "p"
    _quantize(models["llama"], plain, get_scheme("w8a16"), calib_text)
    ids = byte_tokenizer()(calib_text[100:400], return_tensors="pt").input_ids  # (text like the calibration's)
    m = load_quantized(out)
    fqs = [n for b in m.model.layers for n in b.gm.graph.nodes if n.target in FQ]
    assert len(fqs) == 4
    eight = tmp_path / "8"
    _quantize(models["llama"], eight, get_scheme("w8a16", kv_cache="int8-head-asym"), calib_text)
    y_plain = load_quantized(plain)(ids).logits
    err4, err8 = rel_err(m(ids).logits, y_plain), rel_err(load_quantized(eight)(ids).logits, y_plain)
    assert 0 < err8 < err4 / 4  # 16× finer steps: the reloaded scales are the calibrated ones, not noise


@pytest.mark.slow
def test_onnxruntime_quantized_cache_equals_the_reference_runtime(models, tmp_path, calib_text):
    """GroupQueryAttention with an int8 / int4 cache (k_scale, v_scale) computes what qc::fake_quant_kv does, for a
    prompt and for a decode step reading the int8 / packed-int4 cache back."""
    from qcompiler.runtime.onnxruntime import OrtCausalLM

    for spec, dtype, last in (("int8-channel", np.int8, 32), ("int4-head", np.uint8, 16)):
        out = tmp_path / spec
        _quantize(models["ort"], out, get_scheme("w8a16", kv_cache=spec), calib_text, target="onnxruntime",
                  target_options={"lm_head_bits": "float", "accuracy_level": "0"})
        ids = torch.randint(3, 250, (1, 24))
        ref_model = load_quantized(out)
        ort = OrtCausalLM(out)
        logits, present = ort.run(ids.numpy())
        cache = present["past_key_values.0.key"]
        assert cache.dtype == dtype and cache.shape == (1, 2, 24, last)
        assert np.abs(logits - ref_model(ids).logits.detach().numpy()).max() < 1e-4
        step, _ = ort.run(np.array([[7]]), present)
        full = ref_model(torch.cat([ids, torch.tensor([[7]])], 1)).logits[:, -1].detach().numpy()
        assert np.abs(step[:, -1] - full).max() < 1e-4


def test_onnxruntime_refuses_dynamic_or_asymmetric_kv_before_any_work(models, tmp_path, calib_text):
    for spec in ("int8-token", "int8-asym"):
        with pytest.raises(SchemeError, match="symmetric"):
            _quantize(models["ort"], tmp_path / spec, get_scheme("w8a16", kv_cache=spec), calib_text,
                      target="onnxruntime")
        assert not (tmp_path / spec).exists()


def test_msmodelslim_c8_and_compressed_tensors_kv_cache_scheme(models, tmp_path, calib_text):
    out = tmp_path / "asc"
    _quantize(models["llama"], out, get_scheme("w8a8c8"), calib_text, target="ascend")
    desc = json.loads((out / "msmodelslim" / "quant_model_description.json").read_text())
    assert desc["kv_quant_type"] == "C8" and desc["kv_cache_type"] == "C8"
    key = "model.layers.1.self_attn.k_proj.kv_cache_scale"
    assert desc[key] == "C8" and desc[key.replace("scale", "offset")] == "C8"
    index = json.loads((out / "msmodelslim" / "quant_model_weights.safetensors.index.json").read_text())
    with safe_open(out / "msmodelslim" / index["weight_map"][key], "pt") as f:
        assert f.get_tensor(key).shape == (2 * 24,)  # one scale per channel of the cache (H_kv · D)
        assert not f.get_tensor(key.replace("scale", "offset")).any()  # symmetric
    from qcompiler.runtime.msmodelslim import load_msmodelslim

    # the folder run as vllm-ascend / MindIE do (C8 cache emulated) = our artefact; far closer than the same weights
    # without the int8 cache are (a cache grid dropped or misread would move every attention)
    plain = tmp_path / "plain"
    _quantize(models["llama"], plain, get_scheme("w8a8"), calib_text)
    ids = byte_tokenizer()(calib_text[100:400], return_tensors="pt").input_ids
    with torch.no_grad():
        ours, theirs = load_quantized(out)(ids).logits, load_msmodelslim(out / "msmodelslim")(ids).logits
        without_cache = load_quantized(plain)(ids).logits
    assert rel_err(theirs, ours) < 0.1 * rel_err(without_cache, ours), (rel_err(theirs, ours),
                                                                       rel_err(without_cache, ours))
    ours = next(r for r in json.loads((out / "qcompiler.json").read_text())["kv_cache"]["model.layers.1"]
                if r["kind"] == "k")
    with safe_open(out / "block-00001.safetensors", "pt") as f:
        assert torch.allclose(f.get_tensor(ours["tensors"]["scale"]).reshape(-1), _read(out, key))

    ct = tmp_path / "ct"
    _quantize(models["llama"], ct, get_scheme("w8a16", kv_cache="int8-head-asym"), calib_text, target="cuda")
    qc = json.loads((ct / "compressed-tensors" / "config.json").read_text())["quantization_config"]
    assert qc["kv_cache_scheme"]["strategy"] == "attn_head" and qc["kv_cache_scheme"]["symmetric"] is False
    from transformers import AutoModelForCausalLM

    ours = next(r for r in json.loads((ct / "qcompiler.json").read_text())["kv_cache"]["model.layers.0"]
                if r["kind"] == "k")
    with safe_open(ct / "block-00000.safetensors", "pt") as f:
        scale = f.get_tensor(ours["tensors"]["scale"])
    written = _read_ct(ct, "model.layers.0.self_attn.k_scale")
    zero = _read_ct(ct, "model.layers.0.self_attn.k_zero_point")
    assert torch.equal(written.float().reshape(-1), scale.float().reshape(-1))
    # the shapes compressed-tensors itself allocates for this kv_cache_scheme (its initialize_qparams, 2 KV heads
    # of 24 channels): what the client copies the files into
    from compressed_tensors.quantization import QuantizationConfig
    from compressed_tensors.quantization.lifecycle.initialize import (
        initialize_qparams,
        is_cached_attention_module,
    )

    args = QuantizationConfig.model_validate(qc).kv_cache_scheme
    holder = torch.nn.Linear(1, 1)
    initialize_qparams(holder, "k", args, observed_shape=(2, None, 24), observed_dtype=torch.float32,
                       force_zero_point=False)
    assert holder.k_scale.shape == written.shape and holder.k_zero_point.shape == zero.shape == (2, 1, 1)
    loaded = AutoModelForCausalLM.from_pretrained(ct / "compressed-tensors", dtype=torch.float32)
    attn = loaded.model.layers[0].self_attn
    if is_cached_attention_module(attn):  # this transformers / compressed-tensors pair attaches the cache's qparams
        assert torch.allclose(attn.k_scale.detach().float().reshape(-1), scale.reshape(-1))
        assert attn.k_zero_point.shape == (2, 1, 1)
    else:  # transformers ≥ 5.2x calls the argument `cache`, compressed-tensors ≤ 0.20 looks for `past_key_value(s)`
        assert not hasattr(attn, "k_scale")


def _read_ct(out, key):
    index = json.loads((out / "compressed-tensors" / "model.safetensors.index.json").read_text())
    with safe_open(out / "compressed-tensors" / index["weight_map"][key], "pt") as f:
        return f.get_tensor(key)


def _read(out, key):
    index = json.loads((out / "msmodelslim" / "quant_model_weights.safetensors.index.json").read_text())
    with safe_open(out / "msmodelslim" / index["weight_map"][key], "pt") as f:
        return f.get_tensor(key)


def test_serving_formats_refuse_what_they_cannot_hold(models, tmp_path, calib_text):
    with pytest.raises(SchemeError, match="per-tensor or per-head"):
        _quantize(models["llama"], tmp_path / "a", get_scheme("w8a8c8"), calib_text, target="cuda")
    with pytest.raises(SchemeError, match="C8"):
        _quantize(models["llama"], tmp_path / "b", get_scheme("w8a16", kv_cache="int4"), calib_text, target="ascend")
    with pytest.raises(SchemeError, match="latent"):
        _quantize(models["deepseek_v3"], tmp_path / "c", get_scheme("w8a8c8"), calib_text, target="ascend")
    with pytest.raises((ModelLoadError, PassError, SchemeError)):
        _quantize(models["llama"], tmp_path / "d", get_scheme("w4a16", kv_cache="int8"), calib_text, target="cuda",
                  target_options={"format": "awq"})
    assert not any(tmp_path.iterdir())


def test_per_channel_key_ranges_tie_rotary_pairs_so_later_positions_fit():
    """Calibrated at one angle, a key pair (k_0, k_2) = (1, 0) (D = 4, rotate-half pairs i, i + 2) reads (0, 1) at a
    position rotated by 90°: untied, channel 2's calibrated range is ~0 and clips it; tied, both channels share
    ±√(1² + 0²) and the rotated key is on the grid within half a step."""
    from qcompiler.passes.kv_cache.kv_quant import kv_qparams

    lo = torch.tensor([[-1.0, -0.5, -1e-3, -0.5]])  # one head, D = 4
    hi = torch.tensor([[1.0, 0.5, 1e-3, 0.5]])
    args = QuantArgs(bits=8, granularity="channel")
    rotated = torch.tensor([0.0, 0.5, 1.0, 0.5]).reshape(1, 1, 1, 4)
    for tied in (False, True):
        scale, zero = kv_qparams(lo, hi, args, rotary=tied)
        err = (reference.fake_quant_kv(rotated, scale, zero, args.qmin, args.qmax) - rotated).abs()
        if tied:
            assert torch.allclose(scale.reshape(-1)[[0, 2]], torch.full((2,), (1.0 + 1e-6) ** 0.5 / 127))
            assert (err <= scale / 2 + 1e-7).all()
        else:
            assert err[..., 2].item() > 0.9  # clipped to the calibrated ±0.001
