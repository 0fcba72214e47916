"""rotate (QuaRot): Hadamard constructions, the rotated block computing the rotated function, the whole model
unchanged through the artefact (tied head untied), W4A4 with and without rotation, refusals."""

import json

import pytest
import torch
from blocks import context, rel_err, run, traced_block
from tiny import make_tiny_model

import qcompiler.kernels  # noqa: F401
from qcompiler.algorithms.hadamard import hadamard, normalized_hadamard, paley, random_hadamard
from qcompiler.driver import QuantizeConfig, quantize
from qcompiler.errors import PassError, PipelineError
from qcompiler.ir import qmeta
from qcompiler.ir.graph import get_tensor
from qcompiler.pm.manager import PassManager
from qcompiler.pm.pipeline import parse_pipeline
from qcompiler.runtime import load_quantized
from qcompiler.schemes import get_scheme

ROT = torch.ops.qc.hadamard_transform.default


def _quantize(model, out, scheme, text, passes=None, target="reference", **kw):
    cfg = QuantizeConfig(model=model, scheme=scheme, out=out, target=target, calib_texts=[text], num_samples=4,
                         seq_len=48, batch_size=2, progress=False, passes=parse_pipeline(passes) if passes else None,
                         **kw)
    return quantize(cfg, log=lambda s: None)


@pytest.mark.parametrize("n", [12, 20, 96, 160, 576, 1536, 2048, pytest.param(11008, marks=pytest.mark.slow)])
def test_hadamard_orders_are_hadamard(n):
    h = hadamard(n)
    assert h is not None and bool((h.abs() == 1).all())
    # H·Hᵀ = n·I checked on random integer vectors (Freivalds): O(n²) instead of O(n³), and exact in float64 (every
    # partial sum is an integer below n²·1000 < 2⁵³). A wrong H passes one vector with probability ≤ 1/2001
    # (a non-zero row of H·Hᵀ − n·I is orthogonal to a random v of 2001 values per entry at most that often).
    v = torch.randint(-1000, 1001, (n, 8), generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    assert torch.equal(h @ (h.t() @ v), n * v)
    r, kind = random_hadamard(n, seed=3)
    assert kind == "hadamard" and torch.allclose(r @ (r.t() @ v), v, rtol=0, atol=1e-9 * 1000)
    magnitude = r[0, 0].abs()  # every channel spread evenly over all n
    assert bool((r.abs() == magnitude).all()) and abs(float(magnitude) - n**-0.5) < 1e-15
    assert torch.equal(random_hadamard(n, 3)[0], r) and not torch.equal(random_hadamard(n, 4)[0], r)


def test_paley_is_skew_plus_identity_and_unbuildable_orders_fall_back():
    s = paley(11) - torch.eye(12, dtype=torch.float64)
    assert torch.equal(s, -s.t())
    assert hadamard(36) is None and hadamard(6) is None  # (Paley II / prime powers are not implemented)
    r, kind = random_hadamard(36, seed=0)
    assert kind == "random-orthogonal" and torch.allclose(r @ r.t(), torch.eye(36, dtype=torch.float64), atol=1e-10)
    assert normalized_hadamard(36) is None


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma", "mistral"])
def test_rotated_block_computes_the_rotated_function(tiny_models, family):
    gm, inputs = traced_block(tiny_models[family])
    ref = run(gm, inputs)
    ctx = context(inputs, "w4a4")
    gm = PassManager(parse_pipeline("rotate{seed=5}")).run(gm, ctx)
    rep = ctx.report["rotate"]
    assert rep["residual_rotation"] == "hadamard" and rep["folded_norms"] == 2
    assert rep["rotated_outputs"] == 2 and rep["online"] == ["self_attn.o_proj", "mlp.down_proj"]
    rots = [n for n in gm.graph.nodes if n.target == ROT]
    assert len(rots) == 2 and all(next(iter(n.users)).meta[qmeta.ROTATION] == "hadamard" for n in rots)
    norms = [t for t in ("block.input_layernorm.weight", "block.post_attention_layernorm.weight")]
    for t in norms:  # folded: the norm multiplies by 1 (Gemma's (1 + γ) by γ = 0)
        g = get_tensor(gm, t)
        assert torch.allclose(g, torch.full_like(g, float(g[0]))) and float(g[0]) in (0.0, 1.0)
    r = random_hadamard(ref.shape[-1], 5)[0].float()
    out = run(gm, [(a[0] @ r, *a[1:]) for a in inputs])
    assert rel_err(out, ref @ r) < 1e-5


def test_rotated_model_equals_the_float_model_through_the_artefact(tmp_path_factory, calib_text):
    model = make_tiny_model(tmp_path_factory.mktemp("tied") / "m", "llama", tie_word_embeddings=True)
    out = tmp_path_factory.mktemp("o") / "rot"
    desc = _quantize(model, out, get_scheme("w8a16"), calib_text, passes="rotate")
    assert desc["outer_weights"] == {"rotate": {"untied_head": True}}
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    from transformers import AutoModelForCausalLM

    ids = torch.randint(3, 250, (2, 32))
    ref = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)(ids).logits
    assert rel_err(load_quantized(out)(ids).logits, ref) < 1e-5


@pytest.mark.slow
def test_w4a4_rotation_beats_smoothing(tiny_llama, tmp_path, calib_text):
    """On this tiny random model (with outlier channels) rotation beats smoothing; whether GPTQ adds to it is a
    question for the real model (benchmarks/quality.py: on SmolLM2 it does), here it only has to run."""
    from transformers import AutoModelForCausalLM

    ids = torch.randint(3, 250, (2, 48))
    ref = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)(ids).logits
    errors = {}
    for name, passes in (("smoothquant", "smoothquant,fuse_linears,rtn{clip=mse}"), ("rotate", None),
                         ("rotate+gptq", "rotate,fuse_linears,gptq")):
        out = tmp_path / name.replace("+", "_")
        desc = _quantize(tiny_llama, out, get_scheme("w4a4"), calib_text, passes=passes)
        ops = {rec["op"] for rec in desc["layers"].values()}
        assert ops == {"linear_int_dynamic"} and all(rec["activations"]["bits"] == 4 for rec in desc["layers"].values())
        errors[name] = rel_err(load_quantized(out)(ids).logits, ref)
    assert errors["rotate"] < errors["smoothquant"], errors
    assert errors["rotate+gptq"] < 1.0, errors


@pytest.mark.slow
def test_rotation_refuses_moe_blocks_and_formats_without_an_online_rotation(tmp_path_factory, tiny_llama, calib_text):
    ds = make_tiny_model(tmp_path_factory.mktemp("ds") / "m", "deepseek_v3")
    gm, inputs = traced_block(ds, index=1)  # a MoE block: its residual add sums the experts' mixture
    with pytest.raises(PassError, match="not a linear's output"):
        PassManager(parse_pipeline("rotate")).run(gm, context(inputs, "w4a4"))
    out = tmp_path_factory.mktemp("x")
    with pytest.raises(PipelineError, match="online Hadamard"):
        _quantize(tiny_llama, out / "ct", get_scheme("w8a16"), calib_text, passes="rotate,rtn", target="cuda")
    assert not (out / "ct").exists()
    # without the online Hadamard the rotation is all in the weights: any format holds it
    _quantize(tiny_llama, out / "ok", get_scheme("w8a16"), calib_text, passes="rotate{online=false},rtn",
              target="cuda")
    assert (out / "ok" / "compressed-tensors" / "config.json").is_file()


def format_pipeline_of(scheme: str, target: str) -> str:
    from qcompiler.driver import default_pipeline
    from qcompiler.pm.pipeline import format_pipeline
    from qcompiler.targets import get_target

    return format_pipeline(default_pipeline(get_scheme(scheme), get_target(target)))


def test_static_w8a8_default_rotates_where_the_model_admits_it_and_smooths_elsewhere(tiny_models, tmp_path, calib_text,
                                                                                     monkeypatch):
    """A target that asks for it (Target.rotates_static_activations; none does by default since SmoothQuant with
    producers and a searched α measured better) rotates the residual stream before static int8 activations (and
    fits the activation grids by MSE); a model the rotation refuses (Gemma 2's post-norms) gets SmoothQuant instead,
    with the reason said once; other targets and dynamic activations keep SmoothQuant. (The numerics of each family's
    default are cells of the support matrix.)"""
    from family_configs import BY_TYPE, make_family_model

    from qcompiler.targets.reference import ReferenceTarget

    assert format_pipeline_of("w8a8", "reference") == "smoothquant,fuse_linears,rtn,act_quant,lower"
    monkeypatch.setattr(ReferenceTarget, "rotates_static_activations", True)

    from qcompiler.driver import default_pipeline
    from qcompiler.pm.pipeline import format_pipeline
    from qcompiler.targets import get_target

    w8a8 = get_scheme("w8a8")
    assert format_pipeline(default_pipeline(w8a8, get_target("reference"))) == \
        "rotate,fuse_linears,rtn,act_quant{observer=mse},lower"
    assert format_pipeline(default_pipeline(w8a8, get_target("reference"), rotation=False)).startswith("smoothquant,")
    assert format_pipeline(default_pipeline(w8a8, get_target("cuda"))).startswith("smoothquant,")
    # (dynamic activations are smoothed, not rotated: SmoothQuant inside RTN's stages)
    assert format_pipeline(default_pipeline(get_scheme("w8a8_dynamic"), get_target("reference"))) == \
        "fuse_linears,act_quant,sq_rtn,lower"
    models = {"llama": tiny_models["llama"], "gemma2": make_family_model(tmp_path / "gemma2-src", BY_TYPE["gemma2"])}
    for family, expect in (("llama", "rotate,"), ("gemma2", "smoothquant,")):
        logs: list[str] = []
        cfg = QuantizeConfig(model=models[family], scheme=w8a8, out=tmp_path / family, calib_texts=[calib_text],
                             num_samples=2, seq_len=32, batch_size=2, progress=False)
        desc = quantize(cfg, log=logs.append)
        assert desc["pipeline"].startswith(expect), (family, desc["pipeline"])
        # errors are measured against the float block in the same basis (rotated too): int8 grids keep every layer
        # and block output far above 0 dB (comparing x·R with x, the reports read about −5 dB)
        sqnr = [r["output_sqnr_db"] for r in desc["block_report"].values()]
        sqnr += [v for rec in desc["layers"].values() for v in rec["output_sqnr_db"].values()]
        assert min(sqnr) > 15, (family, sqnr)
        said = [line for line in logs if line.startswith("outliers:")]
        assert said == ([] if expect == "rotate," else [said[0]]) and (not said or "post-norm" in said[0]), said
