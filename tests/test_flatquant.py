"""flatquant: the Kronecker transform's maths and kernels, the clipped per-token grid, the pass on a traced block
(structure, the float block unchanged, the fit lowering its error, lowering and reloading from records exactly),
the layers it leaves alone, and a whole model through the artefact."""

import copy
import json
from typing import ClassVar

import pytest
import torch
from blocks import context, rel_err, run, traced_block

import qcompiler.kernels  # noqa: F401
from qcompiler.algorithms.flatquant import (
    fake_quant_act_clipped,
    kronecker_apply,
    kronecker_factors,
    kronecker_weight,
)
from qcompiler.driver import QuantizeConfig, quantize
from qcompiler.errors import PassError, PipelineError
from qcompiler.ir import qmeta
from qcompiler.ir.graph import LINEAR, get_tensor, is_call, set_tensor
from qcompiler.ir.rebuild import rebuild_block
from qcompiler.kernels import reference
from qcompiler.numerics import fake_quant_act_per_token, quantize_act_per_token
from qcompiler.pm.base import Pass, PassResult
from qcompiler.pm.manager import PassManager
from qcompiler.pm.pipeline import parse_pipeline
from qcompiler.runtime import load_quantized
from qcompiler.schemes import get_scheme

KRON = torch.ops.qc.kronecker_transform.default


def _apply(gm, ctx, text):
    return PassManager(parse_pipeline(text)).run(gm, ctx)


@pytest.mark.parametrize(("k", "ab"), [(576, (24, 24)), (1536, (32, 48)), (4096, (64, 64)), (14336, (112, 128)),
                                       (12, (2, 6)), (7, (1, 7))])
def test_kronecker_factors_are_vllm_ascends_split(k, ab):
    # the smallest m ≥ √k with m² − k a square n²: (m − n, m + n), the shapes W4A4_FLATQUANT_DYNAMIC allocates
    a, b = kronecker_factors(k)
    assert (a, b) == ab and a * b == k


def test_kronecker_transform_is_the_kronecker_product_and_the_weights_undo_it():
    g = torch.Generator().manual_seed(0)
    left = torch.eye(6, dtype=torch.float64) + 0.3 * torch.randn(6, 6, generator=g, dtype=torch.float64)
    right = torch.eye(8, dtype=torch.float64) + 0.3 * torch.randn(8, 8, generator=g, dtype=torch.float64)
    x = torch.randn(3, 5, 48, generator=g, dtype=torch.float64)
    w = torch.randn(10, 48, generator=g, dtype=torch.float64)
    p = torch.kron(left, right)
    assert torch.allclose(kronecker_apply(x, left, right), x @ p, rtol=0, atol=1e-12)
    assert torch.allclose(kronecker_weight(w, left, right), w @ torch.linalg.inv(p).t(), rtol=0, atol=1e-10)
    y = kronecker_apply(x, left, right) @ kronecker_weight(w, left, right).t()
    assert torch.allclose(y, x @ w.t(), rtol=0, atol=1e-10)
    # the op (float32 in, float32 out) computes the same product; a mismatched size is refused by name
    out = torch.ops.qc.kronecker_transform(x.float(), left.float(), right.float())
    assert out.dtype == torch.float32 and rel_err(out.double(), x @ p) < 1e-6
    with pytest.raises(ValueError, match="does not match the input size 48"):
        reference.kronecker_transform(x, left[:5, :5], right)


def test_clipped_per_token_grid_and_its_training_twin():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(16, 64, generator=g)
    q, s = quantize_act_per_token(x, 4, 0.5)
    assert torch.equal(s, x.abs().amax(-1, keepdim=True) * 0.5 / 7)
    assert int(q.max()) == 7 and int(q.min()) == -8  # half the range: every token's peaks clamp to the ends
    assert torch.equal(quantize_act_per_token(x, 4, 1.0)[0], quantize_act_per_token(x, 4)[0])
    # the differentiable twin computes the same values and passes a gradient to the clip ratio
    clip = torch.tensor(0.5, requires_grad=True)
    y = fake_quant_act_clipped(x, 4, clip)
    assert torch.equal(y, fake_quant_act_per_token(x, 4, 0.5))
    y.square().sum().backward()
    assert clip.grad is not None and float(clip.grad) != 0.0
    # the op and the integer GEMM take the same grid
    assert torch.equal(torch.ops.qc.fake_quant_act_per_token(x, 4, 0.5), y.detach())
    qw = torch.randint(-8, 8, (5, 64), generator=g, dtype=torch.int8)
    sw = torch.rand(5, 1, generator=g) + 0.5
    out = reference.linear_int_dynamic(x, qw, sw, None, 4, 0, 0.5)
    assert rel_err(out, y.detach() @ (qw.float() * sw).t()) < 1e-6


@pytest.mark.slow
def test_flatquant_pass_on_a_block_lowers_and_reloads_exactly(tiny_llama):
    gm, inputs = traced_block(tiny_llama, seq=32, n_batches=2)
    ctx = context(inputs, "w4a4")
    gm = _apply(gm, ctx, "rotate,fuse_linears")
    ref = run(gm, inputs)
    kept = _apply(copy.deepcopy(gm), context(inputs, "w4a4"), "flatquant{steps=2,absorb_hadamard=false}")
    assert sorted(n.meta[qmeta.ROTATION] for n in kept.graph.nodes if is_call(n, LINEAR)) == (
        ["hadamard+kronecker"] * 2 + ["kronecker"] * 2)  # (the online Hadamards stay, the transforms follow them)
    gm = _apply(gm, ctx, "flatquant{steps=30,micro_batch=1}")
    rep = ctx.report["flatquant"]
    # structure: one transform per input (q/k/v, o, gate/up, down). o_proj's online Hadamard (96 = 8·12: H_8 ⊗ H_12)
    # is absorbed into its transform's starting point; down_proj's stays (160 = 10·16 and there is no H_10)
    krons = [n for n in gm.graph.nodes if n.target == KRON]
    assert len(krons) == 4 and len(rep["sites"]) == 4 and rep["absorbed_hadamards"] == 1
    assert rep["sites"]["mlp.down_proj"]["kronecker"] == [10, 16]
    linears = [n for n in gm.graph.nodes if is_call(n, LINEAR)]
    assert all(n.args[0].target == KRON for n in linears)
    assert {n.meta[qmeta.PATH] if qmeta.PATH in n.meta else str(n.args[1].target): n.meta[qmeta.ROTATION]
            for n in linears}["block.mlp.down_proj.weight"] == "hadamard+kronecker"
    assert sorted(n.meta[qmeta.ROTATION] for n in linears) == ["hadamard+kronecker"] + ["kronecker"] * 3
    assert all(0.5 < s["clip_ratio"] < 1.0 for s in rep["sites"].values())
    # per-channel scaling: folded into the norms before q/k/v and gate/up and into v's rows before o_proj (its
    # Hadamard absorbed, o reads attention's output); none before down_proj (it reads the online Hadamard's output)
    assert {k: v["diag_scale"] for k, v in rep["sites"].items()} == {
        "self_attn.qkv_proj": "norm", "mlp.gate_up_proj": "norm", "self_attn.o_proj": "rows", "mlp.down_proj": None}
    # numerics: the float block computes what it computed (P and W·P⁻ᵀ cancel); the fit lowered the block's error
    assert rel_err(run(gm, inputs), ref) < 1e-4
    assert rep["block_mse"]["loss_end"] < rep["block_mse"]["loss_start"]
    gm = _apply(gm, ctx, "rtn,act_quant")
    fq = run(gm, inputs)
    clips = [n.args[2] for n in gm.graph.nodes if n.target == torch.ops.qc.fake_quant_act_per_token.default]
    assert len(clips) == 4 and all(c < 1.0 for c in clips)
    lowered = _apply(gm, ctx, "lower")
    assert rel_err(run(lowered, inputs), fq) < 1e-5
    records = [n.meta[qmeta.RECORD] for n in lowered.graph.nodes if qmeta.RECORD in n.meta]
    assert all(r.activations["clip_ratio"] < 1.0 and {"left_trans", "right_trans"} <= set(r.tensors) for r in records)
    # a fresh float block rebuilt from the records (what loading an artefact does) computes the same
    fresh, _ = traced_block(tiny_llama, seq=32, n_batches=2)
    rebuild_block(fresh, records, "model.layers.0")
    fresh.recompile()
    for r in records:
        for name in [*r.tensors.values(), *([r.bias] if r.bias else [])]:
            set_tensor(fresh, name, get_tensor(lowered, name))
    for t in ("block.input_layernorm.weight", "block.post_attention_layernorm.weight"):
        set_tensor(fresh, t, get_tensor(lowered, t))  # (the rotation folded the norms)
    assert rel_err(run(fresh, inputs), fq) < 1e-5


def test_flatquant_diagonal_scaling_folds_into_norms_and_producer_rows(tiny_llama):
    """Without rotations, down_proj reads act(gate)·up: its divisor d goes into up's rows inside the fused gate_up;
    o_proj's into v's rows inside the fused qkv (one entry per kv channel); the others into the norms. The float
    block is unchanged; the fit with d ends lower than without."""
    gm, inputs = traced_block(tiny_llama, seq=32, n_batches=2)
    ctx = context(inputs, "w4a4")
    gm = _apply(gm, ctx, "fuse_linears")
    ref = run(gm, inputs)
    before = {name: get_tensor(gm, name).clone() for name in (
        "block.input_layernorm.weight", "block.post_attention_layernorm.weight")}
    float_gm = copy.deepcopy(gm)
    ctx_plain = context(inputs, "w4a4")
    plain = _apply(copy.deepcopy(gm), ctx_plain, "flatquant{steps=20,diag_scale=false}")
    gm = _apply(gm, ctx, "flatquant{steps=20}")
    rep = ctx.report["flatquant"]
    assert {k: v["diag_scale"] for k, v in rep["sites"].items()} == {
        "self_attn.qkv_proj": "norm", "self_attn.o_proj": "rows", "mlp.gate_up_proj": "norm", "mlp.down_proj": "rows"}
    assert rel_err(run(gm, inputs), ref) < 1e-5
    assert rel_err(run(plain, inputs), ref) < 1e-5
    for name in ("block.input_layernorm.weight", "block.post_attention_layernorm.weight"):
        assert not torch.equal(get_tensor(gm, name), before[name])
        assert torch.equal(get_tensor(plain, name), before[name])
    # down_proj's input is now x/d: divided channel by channel, the same d for every token
    down = next(n for n in gm.graph.nodes if is_call(n, LINEAR) and "down_proj" in str(n.args[1].target))
    site_input = down.args[0].args[0].name  # (down reads qc::kronecker_transform(act(gate)·up, L, R))
    scaled, unscaled = _node_value(gm, site_input, inputs), _node_value(float_gm, site_input, inputs)
    d = (unscaled * scaled).sum(0) / scaled.square().sum(0)  # (least squares per channel)
    assert rel_err(scaled * d, unscaled) < 1e-5
    assert float(d.std() / d.mean()) > 1e-2  # (and d is not a constant: it differs channel by channel)
    # o_proj's input under grouped-query attention (4 query heads, 2 kv heads of 24): divided by one d per kv
    # channel, the two query heads of a group by the same entries
    o = next(n for n in gm.graph.nodes if is_call(n, LINEAR) and "o_proj" in str(n.args[1].target))
    site_input = o.args[0].args[0].name
    scaled, unscaled = _node_value(gm, site_input, inputs), _node_value(float_gm, site_input, inputs)
    d = ((unscaled * scaled).sum(0) / scaled.square().sum(0)).reshape(2, 2, 24)  # [kv head, group, head_dim]
    assert rel_err(scaled * d.reshape(-1), unscaled) < 1e-5
    assert torch.allclose(d[:, 0], d[:, 1], rtol=1e-5) and not torch.allclose(d[0, 0], d[1, 0], rtol=1e-2)
    assert rep["block_mse"]["loss_end"] < ctx_plain.report["flatquant"]["block_mse"]["loss_end"]


def _node_value(gm, name, inputs):
    """The value of node `name` on the first calibration batch, every token as a row."""
    seen = {}

    class Capture(torch.fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            if n.name == name:
                seen["x"] = out.detach().reshape(-1, out.shape[-1])
            return out

    with torch.no_grad():
        Capture(gm).run(*inputs[0])
    return seen["x"].double()


def test_gptq_on_quantized_inputs_reads_each_sites_learned_clip(tiny_llama, monkeypatch):
    """gptq{quantized_input=true} after flatquant measures H̃ on the grid the layer runs: c·max|x'_t|/7."""
    import qcompiler.pm.base as base

    seen = []

    def spy(gm, requests, *args, **kwargs):
        seen.extend(requests)
        return collect(gm, requests, *args, **kwargs)

    collect = base.collect_stats
    monkeypatch.setattr(base, "collect_stats", spy)
    gm, inputs = traced_block(tiny_llama, seq=16, n_batches=1)
    ctx = context(inputs, "w4a4")
    gm = _apply(gm, ctx, "rotate,fuse_linears,flatquant{steps=3},gptq{quantized_input=true}")
    clips = {n.args[0].name: n.meta[qmeta.TRANSFORM]["clip_ratio"] for n in gm.graph.nodes if is_call(n, LINEAR)}
    quantized = {r.node: r.clip_ratio for r in seen if r.kind == "hessian_quantized"}
    assert quantized == clips and len(clips) == 4 and all(c != 1.0 for c in clips.values())
    assert all(v["quantized_input"] for v in ctx.report["gptq"]["layers"].values())


def test_flatquant_leaves_layers_without_per_token_activations_alone(tiny_llama):
    for scheme in ("w4a16", "w8a8"):
        gm, inputs = traced_block(tiny_llama, seq=16, n_batches=1)
        ctx = context(inputs, scheme)
        gm = _apply(gm, ctx, "flatquant{steps=2}")
        assert "no linear of this block quantizes activations per token" in ctx.report["flatquant"]["skipped"]
        assert not any(n.target == KRON for n in gm.graph.nodes)
    with pytest.raises(PipelineError, match="micro_batch ≥ 1"):
        parse_pipeline("flatquant{micro_batch=0}")


@pytest.mark.slow
def test_flatquant_model_through_the_artefact(tiny_llama, tmp_path, calib_text):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "fq"
    cfg = QuantizeConfig(model=tiny_llama, scheme=get_scheme("w4a4"), out=out, calib_texts=[calib_text],
                         num_samples=4, seq_len=48, batch_size=2, progress=False,
                         passes=parse_pipeline("rotate,fuse_linears,flatquant{steps=10},rtn"))
    desc = quantize(cfg, log=lambda s: None)
    layers = desc["layers"].values()
    assert all("kronecker" in rec["input_rotation"] and rec["activations"]["clip_ratio"] < 1.0 for rec in layers)
    model = load_quantized(out)
    graph = model.model.layers[0].gm.graph
    assert sum(n.target == KRON for n in graph.nodes) == 4
    assert sum(n.target == torch.ops.qc.hadamard_transform.default for n in graph.nodes) == 1  # (down_proj's)
    ids = torch.randint(3, 250, (2, 48), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)(ids).logits
        assert rel_err(model(ids).logits, ref) < 1.0


# ---------------------------------------------------------------- msModelSlim W4A4_FLATQUANT_DYNAMIC (ascend)


@pytest.fixture(scope="module")
def llama_192(tmp_path_factory):
    """A tiny Llama whose MLP width 192 = 12·16 has Hadamard Kronecker factors (H_12 Paley, H_16 Sylvester), so
    flatquant can fold rotate's online Hadamard before down_proj into its transform."""
    from tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("llama192") / "m", "llama", intermediate_size=192)


def _ascend(model, out, calib_text, passes):
    return quantize(QuantizeConfig(model=model, scheme=get_scheme("w4a4"), out=out, target="ascend",
                                   calib_texts=[calib_text], num_samples=4, seq_len=32, batch_size=2, progress=False,
                                   passes=parse_pipeline(passes)), log=lambda s: None)


@pytest.mark.parametrize("weights", ["rtn", "gptq{quantized_input=true},tune_grids{steps=5}"])
def test_ascend_export_holds_the_learned_transforms_and_runs_as_vllm_ascend_would(llama_192, tmp_path, calib_text,
                                                                                   weights):
    """rotate (online) + flatquant on the ascend target: every Hadamard folds into L ⊗ R, the msModelSlim folder
    describes W4A4_FLATQUANT_DYNAMIC layers with left_trans [a, a], right_trans [b, b], clip_ratio [1], and the
    emulated vllm-ascend call sequence (npu_kronecker_quant → int4 × int4 npu_quant_matmul) on those tensors
    computes what our artefact computes — also with the clips and scales tune_grids re-fitted."""
    from qcompiler.runtime.msmodelslim import load_msmodelslim, read_folder

    out = tmp_path / "fq"
    _ascend(llama_192, out, calib_text, f"rotate,fuse_linears,flatquant{{steps=5}},{weights}")
    desc, tensors = read_folder(out / "msmodelslim")
    assert desc["model_quant_type"] == "W4A4_FLATQUANT_DYNAMIC"
    assert tensors["model.layers.1.mlp.down_proj.weight"].shape[1] == 192
    for leaf in ("self_attn.q_proj", "self_attn.o_proj", "mlp.up_proj", "mlp.down_proj"):
        base = f"model.layers.1.{leaf}."
        a, b = kronecker_factors(tensors[base + "weight"].shape[1])
        assert desc[base + "weight"] == desc[base + "left_trans"] == "W4A4_FLATQUANT_DYNAMIC"
        assert tensors[base + "weight"].dtype == torch.int8
        assert int(tensors[base + "weight"].min()) >= -8 and int(tensors[base + "weight"].max()) <= 7
        assert tensors[base + "left_trans"].shape == (a, a) and tensors[base + "right_trans"].shape == (b, b)
        assert tensors[base + "clip_ratio"].dtype == torch.float32 and tensors[base + "clip_ratio"].shape == (1,)
        assert 0.0 < float(tensors[base + "clip_ratio"]) <= 1.0
        assert tensors[base + "weight_scale"].shape == tensors[base + "weight_offset"].shape == (
            tensors[base + "weight"].shape[0], 1)
    # q/k/v share one input, so one transform: what vLLM's fused qkv_proj loads from any of them
    q, v = "model.layers.0.self_attn.q_proj.", "model.layers.0.self_attn.v_proj."
    assert torch.equal(tensors[q + "left_trans"], tensors[v + "left_trans"])
    ids = torch.randint(3, 250, (2, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ours = load_quantized(out)(ids).logits
        npu = load_msmodelslim(out / "msmodelslim")(ids).logits
    # the same int4 codes on both sides; float32 sums in another order may move a rounding tie by one code
    assert rel_err(npu, ours) < 2e-3


def test_ascend_w4a4_dynamic_runs_as_vllm_ascend_would(tiny_llama, tmp_path, calib_text):
    from qcompiler.runtime.msmodelslim import load_msmodelslim, read_folder

    out = tmp_path / "w4a4"
    _ascend(tiny_llama, out, calib_text, "rotate{online=false},fuse_linears,rtn")
    desc, tensors = read_folder(out / "msmodelslim")
    assert desc["model.layers.0.mlp.down_proj.weight"] == "W4A4_DYNAMIC"
    assert not any(name.endswith("left_trans") for name in tensors)
    ids = torch.randint(3, 250, (2, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert rel_err(load_msmodelslim(out / "msmodelslim")(ids).logits, load_quantized(out)(ids).logits) < 2e-3


def test_ascend_refuses_a_hadamard_flatquant_cannot_fold(tiny_llama, tmp_path, calib_text):
    # the tiny Llama's MLP width 160 = 10·16: no H_10, so down_proj's online Hadamard would stay, and msModelSlim
    # has none; refused by the pass, naming the layer, before anything is written
    out = tmp_path / "refused"
    with pytest.raises(PassError, match=r"online Hadamard before .*down_proj.*\(160 inputs\).*rotate\{online=false\}"):
        _ascend(tiny_llama, out, calib_text, "rotate,fuse_linears,flatquant{steps=1},rtn")
    assert not out.exists()


def test_targets_refuse_flatquant_they_cannot_hold(tiny_llama, tmp_path, calib_text):
    # cuda / onnxruntime formats hold no learned transform; msModelSlim holds it for W4A4 only; refused at planning,
    # before anything is written
    for target, scheme, match in (("cuda", "w4a8", "hold no learned transform"),
                                  ("onnxruntime", "w8a8_dynamic", "hold no learned transform"),
                                  ("ascend", "w8a8_dynamic", "W4A4_FLATQUANT_DYNAMIC only")):
        out = tmp_path / target
        cfg = QuantizeConfig(model=tiny_llama, scheme=get_scheme(scheme), out=out, target=target,
                             calib_texts=[calib_text], num_samples=2, seq_len=16, progress=False,
                             passes=parse_pipeline("fuse_linears,flatquant{steps=1},rtn"))
        with pytest.raises(PipelineError, match=f"target '{target}': .*{match}"):
            quantize(cfg, log=lambda s: None)
        assert not out.exists()


def test_moe_blocks_are_refused_by_name(tmp_path, calib_text):
    # expert routing (qc::routed) has no gradient: one clear line naming the block, not an autograd error
    from family_configs import FAMILIES, make_family_model

    family = next(f for f in FAMILIES if f.model_type == "qwen3_moe")
    model = make_family_model(tmp_path / "moe", family)
    cfg = QuantizeConfig(model=model, scheme=get_scheme("w4a4"), out=tmp_path / "q", calib_texts=[calib_text],
                         num_samples=2, seq_len=16, progress=False,
                         passes=parse_pipeline("fuse_linears,flatquant{steps=1},rtn"))
    with pytest.raises(PassError, match=r"block 'model.layers.0' routes tokens to experts.*drop it"):
        quantize(cfg, log=lambda s: None)
    assert not (tmp_path / "q").exists()


# ---------------------------------------------------------------- targets=model: the float model's stream


class _RecordFloatStream(Pass):
    """A test pass that reads the float stream and keeps what each block got."""

    name = "test_record_float_stream"
    seen: ClassVar[dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}

    def uses_float_stream(self) -> bool:
        return True

    def run(self, gm, ctx, stats):
        assert ctx.float_calib is not None
        self.seen[ctx.block] = (ctx.calib[0][0].clone(), ctx.float_calib[0][0].clone())
        return PassResult(gm, False, {})


def test_driver_carries_the_float_models_block_inputs_beside_the_quantized_ones(tiny_llama, tmp_path, calib_text):
    """With a pass that asks for it, each block sees the float model's own hidden states (transformers' hidden
    states of the same batch) beside the quantized model's: equal at block 0, apart after quantized blocks."""
    from transformers import AutoModelForCausalLM

    _RecordFloatStream.seen.clear()
    quantize(QuantizeConfig(model=tiny_llama, scheme=get_scheme("w4a4"), out=tmp_path / "q", calib_texts=[calib_text],
                            num_samples=2, seq_len=16, batch_size=2, progress=False,
                            passes=parse_pipeline("test_record_float_stream,rtn,act_quant")), log=lambda s: None)
    seen = _RecordFloatStream.seen
    assert sorted(seen) == [f"model.layers.{i}" for i in range(len(seen))] and len(seen) >= 2
    quant0, float0 = seen["model.layers.0"]
    assert torch.equal(quant0, float0)
    ids = _calibration_ids(tiny_llama, calib_text)
    with torch.no_grad():
        hidden = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)(
            ids, output_hidden_states=True).hidden_states
    for i in range(1, len(seen)):
        quant, flt = seen[f"model.layers.{i}"]
        assert rel_err(flt, hidden[i]) < 1e-5
        assert rel_err(quant, hidden[i]) > 1e-3  # (the quantized stream carries the w4a4 error)


def _calibration_ids(model_dir, text):
    from transformers import AutoTokenizer

    from qcompiler.calib.data import calibration_batches

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    return calibration_batches(tok, [text], num_samples=2, seq_len=16, batch_size=2)[0]


def test_flatquant_model_targets(tiny_llama, tmp_path, calib_text):
    """targets=model fits to the float model's outputs: given the block's own inputs as the float stream it is
    the default fit exactly; without a float stream it is refused by name; through the driver it quantizes."""
    gm, inputs = traced_block(tiny_llama, seq=32, n_batches=2)
    ctx = context(inputs, "w4a4")
    gm = _apply(gm, ctx, "rotate,fuse_linears")
    block = _apply(copy.deepcopy(gm), context(inputs, "w4a4"), "flatquant{steps=5}")
    same = context(inputs, "w4a4")
    same.float_calib = inputs
    model = _apply(copy.deepcopy(gm), same, "flatquant{steps=5,targets=model}")
    assert all(torch.equal(a, b) for a, b in zip(block.state_dict().values(), model.state_dict().values(), strict=True))
    with pytest.raises(PassError, match="targets=model needs the float model's inputs"):
        _apply(copy.deepcopy(gm), context(inputs, "w4a4"), "flatquant{steps=1,targets=model}")
    with pytest.raises(PipelineError):
        parse_pipeline("flatquant{targets=other}")
    desc = quantize(QuantizeConfig(model=tiny_llama, scheme=get_scheme("w4a4"), out=tmp_path / "q",
                                   calib_texts=[calib_text], num_samples=4, seq_len=32, batch_size=2, progress=False,
                                   passes=parse_pipeline("rotate,fuse_linears,flatquant{steps=5,targets=model},rtn")),
                    log=lambda s: None)
    reports = desc["block_report"].values()
    assert len(reports) >= 2 and all(r["passes"]["flatquant"]["block_mse"]["loss_end"] > 0 for r in reports)


def test_algo_flatquant_is_the_documented_pipeline(tiny_llama, tmp_path, calib_text, capsys):
    """`--algo flatquant` (w4a4) plans docs/kv-rotation-sparsity.md run 9's pipeline — rotate, fuse_linears, flatquant,
    gptq{quantized_input=true}, tune_grids — and writes what that pipeline written out with --passes writes, tensor
    for tensor; the default w4a4 run names it; a scheme without int4 per-token activations is refused by name, before
    anything is written."""
    from safetensors.torch import load_file

    from qcompiler.cli import main
    from qcompiler.driver.plan import default_pipeline
    from qcompiler.pm.pipeline import format_pipeline
    from qcompiler.targets import get_target

    text = tmp_path / "t.txt"
    text.write_text(calib_text)
    base = ["quant", "--model", str(tiny_llama), "--calib-text", str(text), "--num-samples", "4", "--seq-len", "32",
            "--batch-size", "2", "--no-progress"]
    assert main([*base, "--scheme", "w4a4", "--dry-run", "--out", str(tmp_path / "d")]) == 0
    assert "--algo flatquant" in capsys.readouterr().out
    torch.manual_seed(0)
    assert main([*base, "--scheme", "w4a4", "--algo", "flatquant", "--out", str(tmp_path / "a")]) == 0
    torch.manual_seed(0)
    assert main([*base, "--scheme", "w4a4", "--out", str(tmp_path / "b"),
                 "--passes", "rotate,fuse_linears,flatquant,gptq{quantized_input=true},tune_grids"]) == 0
    ascend = format_pipeline(default_pipeline(get_scheme("w4a4"), get_target("ascend"), "flatquant"))
    assert ascend == "rotate{online=False},fuse_linears,flatquant,gptq{quantized_input=True},tune_grids,act_quant,lower"
    pipelines = [json.loads((tmp_path / o / "qcompiler.json").read_text())["pipeline"] for o in "ab"]
    assert pipelines[0] == pipelines[1] == ("rotate,fuse_linears,flatquant,gptq{quantized_input=True},tune_grids,"
                                            "act_quant,lower")
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.safetensors"))
    assert files and files == sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*.safetensors"))
    for f in files:
        a, b = load_file(tmp_path / "a" / f), load_file(tmp_path / "b" / f)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f
    assert any(k.endswith("left_trans") or "kronecker" in k for f in files for k in load_file(tmp_path / "a" / f))
    capsys.readouterr()
    assert main([*base, "--scheme", "w8a8_dynamic", "--algo", "flatquant", "--out", str(tmp_path / "e")]) == 2
    assert "--algo flatquant learns transforms for int4 per-token activations" in capsys.readouterr().err
    assert not (tmp_path / "e").exists()


def test_flatquant_fits_under_bfloat16_autocast_too(tiny_llama):
    """fit_precision=bfloat16: each fitting step's block run is under bfloat16 autocast. The fit still lowers the
    block's error; the reported losses stay float32 measurements (the start loss, before any step, is the float32
    fit's exactly); the transforms differ from the float32 fit's (the runs really were rounded), and the float block
    is unchanged by them all the same; a precision without a fitting path is refused by name."""
    gm, inputs = traced_block(tiny_llama, seq=32, n_batches=2)
    gm = _apply(gm, context(inputs, "w4a4"), "rotate,fuse_linears")
    ref = run(gm, inputs)
    fits = {}
    for precision in ("float32", "bfloat16"):
        ctx = context(inputs, "w4a4")
        fitted = _apply(copy.deepcopy(gm), ctx, f"flatquant{{steps=30,fit_precision={precision}}}")
        losses = ctx.report["flatquant"]["block_mse"]
        assert losses["loss_end"] < losses["loss_start"]
        assert rel_err(run(fitted, inputs), ref) < 1e-4
        lefts = [get_tensor(fitted, str(n.args[1].target)) for n in fitted.graph.nodes if n.target == KRON]
        fits[precision] = losses, lefts
    assert fits["float32"][0]["loss_start"] == fits["bfloat16"][0]["loss_start"]
    assert len(fits["bfloat16"][1]) == 4
    assert any(not torch.equal(a, b) for a, b in zip(fits["float32"][1], fits["bfloat16"][1], strict=True))
    with pytest.raises(PipelineError, match="fit_precision"):
        parse_pipeline("flatquant{fit_precision=float16}")
