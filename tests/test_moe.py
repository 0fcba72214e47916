"""Mixture-of-experts blocks (Mixtral, Qwen2-MoE, Qwen3-MoE, DeepSeek-V2/V3 with MLA): per-expert linears,
calibration that reaches every expert, routers in float."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny import MOE_FAMILIES, make_tiny_model

from qcompiler.driver import QuantizeConfig, quantize
from qcompiler.errors import ModelLoadError
from qcompiler.frontends.hf import BlockTracer, Checkpoint, build_skeleton, find_blocks, probe_block_inputs
from qcompiler.ir.graph import LINEAR, is_call
from qcompiler.ir.routing import EXPERT_ROUTING, ROUTED
from qcompiler.numerics import fake_quant_weight
from qcompiler.pm.pipeline import parse_pipeline
from qcompiler.runtime import load_quantized
from qcompiler.schemes import get_scheme


@pytest.fixture(scope="module")
def moe_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe")
    return {fam: make_tiny_model(root / fam, fam) for fam in MOE_FAMILIES}


def _quantize(model, out, scheme, text, passes=None, **kw):
    cfg = QuantizeConfig(model=model, scheme=scheme, out=out, calib_texts=[text], num_samples=4, seq_len=48,
                         batch_size=2, progress=False, passes=parse_pipeline(passes) if passes else None, **kw)
    return quantize(cfg, log=lambda s: None)


def _is_router(name: str) -> bool:
    return name.endswith((".gate", "shared_expert_gate"))


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_moe_block_graph_has_one_linear_per_expert_projection(moe_models, family):
    ckpt = Checkpoint(moe_models[family])
    model = build_skeleton(ckpt)
    prefix, blocks = find_blocks(model)
    gm = BlockTracer(probe_block_inputs(model))(len(blocks) - 1, blocks[-1], f"{prefix}.{len(blocks) - 1}")
    routing = [n for n in gm.graph.nodes if is_call(n, EXPERT_ROUTING)]
    markers = [n for n in gm.graph.nodes if is_call(n, ROUTED)]
    weights = {str(n.args[1].target) for n in gm.graph.nodes if is_call(n, LINEAR) and n.args[1].op == "get_attr"}
    assert len(routing) == 1 and len(markers) == 2 * 4  # each expert's gate/up input and down input
    expert_weights = {w for w in weights if ".experts." in w}
    assert len(expert_weights) == 4 * 3
    # the linears carry the checkpoint's own names, so every tensor of the block is in the checkpoint
    block = f"{prefix}.{len(blocks) - 1}"
    assert all(f"{block}.{w.removeprefix('block.')}" in ckpt for w in expert_weights)


@pytest.mark.parametrize("family", MOE_FAMILIES)
@pytest.mark.slow
def test_moe_quantized_model_matches_fake_quantized_float_model(moe_models, family, tmp_path, calib_text):
    """Every expert and attention linear quantized, routers float: the reloaded model's logits equal those of
    transformers' own (sparse) model with each expert weight fake-quantized."""
    from transformers import AutoModelForCausalLM

    scheme = get_scheme("w8a16")
    desc = _quantize(moe_models[family], tmp_path / "q", scheme, calib_text)
    paths = set(desc["layers"])
    assert not any(_is_router(p) for p in paths)  # routers stay float by default
    n_experts = sum(1 for p in paths if ".experts." in p)
    assert n_experts == 4 * 2 * (1 if family.startswith("deepseek") else 2)  # (gate_up fused) × down per expert

    ref = AutoModelForCausalLM.from_pretrained(str(moe_models[family]), dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if ".layers." not in name or "norm" in name or _is_router(name.rsplit(".", 1)[0]) or p.dim() < 2:
                continue
            if p.dim() == 3:  # stacked experts: each expert's rows quantize on their own
                for e in range(p.shape[0]):
                    p[e] = fake_quant_weight(p[e], scheme.weights)
            else:
                p.copy_(fake_quant_weight(p, scheme.weights))
    ids = torch.randint(3, 250, (2, 20), generator=torch.Generator().manual_seed(0))
    quantized = load_quantized(tmp_path / "q")
    # the routing markers only steer calibration: the served graph has none (and no copies)
    assert not any(is_call(n, ROUTED) for b in quantized.model.layers for n in b.gm.graph.nodes)
    with torch.no_grad():
        expected = ref(ids).logits
        got = quantized(ids).logits
    assert (got - expected).abs().max() < 1e-3 * expected.abs().max()


@pytest.mark.slow
@pytest.mark.parametrize("algo", ["gptq", "awq+gptq"])
def test_every_expert_reports_its_tokens_and_an_unrouted_expert_falls_back_to_all_tokens(tmp_path, calib_text, algo):
    """DeepSeek-V3 with expert 3's router bias at -1e4: no token is routed to it. GPTQ's Hessian for its
    linears is then taken over all tokens (reported), never left empty — also inside awq_gptq's paused runs (AWQ's
    statistics of the expert's down input included)."""
    model = make_tiny_model(tmp_path / "ds3", "deepseek_v3")
    f = next(model.glob("*.safetensors"))
    tensors = load_file(str(f))
    tensors["model.layers.1.mlp.gate.e_score_correction_bias"][3] = -1e4
    save_file(tensors, str(f), metadata={"format": "pt"})

    desc = _quantize(model, tmp_path / "q", get_scheme("w4a16", group_size=32), calib_text, algo=algo)
    assert desc["pipeline"].startswith("awq_gptq" if algo == "awq+gptq" else "fuse_linears,gptq")
    report = desc["block_report"]["model.layers.1"]
    tokens = report["expert_tokens"]
    assert set(tokens) == {f"mlp.experts.{e}" for e in range(4)}
    # grouped routing (2 groups of 2, one group per token) never picks the group holding expert 3, so its
    # neighbour goes unrouted too
    unrouted = sorted(k for k, v in tokens.items() if v == 0)
    assert unrouted == ["mlp.experts.2", "mlp.experts.3"]
    assert sum(tokens.values()) == 4 * 48 * 2  # every calibration token goes to its top-2
    assert report["passes"]["moe"]["experts_calibrated_on_all_tokens"] == unrouted
    assert "model.layers.0" not in desc["block_report"] or "expert_tokens" not in desc["block_report"]["model.layers.0"]
    # its weights are a real GPTQ result: finite, and close to the float weights
    layers = desc["layers"]
    sqnr = layers["model.layers.1.mlp.experts.3.down_proj"]["output_sqnr_db"]
    assert all(v > 15 for v in sqnr.values())


@pytest.mark.slow
def test_calibrate_all_experts_widens_static_input_ranges_only(moe_models, tmp_path, calib_text):
    """Static w8a8: each expert's input scale covers its routed tokens (default) or all tokens (option); the
    all-token range contains the routed one, and with top-2 of 4 experts it is wider for some expert."""
    scheme = get_scheme("w8a8")
    routed = _quantize(moe_models["qwen3_moe"], tmp_path / "routed", scheme, calib_text, passes="rtn")
    every = _quantize(moe_models["qwen3_moe"], tmp_path / "all", scheme, calib_text, passes="rtn",
                      calibrate_all_experts=True)
    # block 0 sees the same inputs in both runs (later blocks see the outputs of differently quantized ones)
    assert routed["block_report"]["model.layers.0"]["expert_tokens"] == every["block_report"]["model.layers.0"]["expert_tokens"]

    def input_scales(out):
        index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
        found = {}
        for name, file in index.items():
            if name.startswith("model.layers.0.") and ".experts." in name and name.endswith("input_scale"):
                found[name] = float(load_file(str(out / file))[name])
        return found

    a, b = input_scales(tmp_path / "routed"), input_scales(tmp_path / "all")
    assert a.keys() == b.keys() and len(a) == 4 * 3  # 4 experts × (gate, up, down)
    assert all(b[k] >= a[k] * (1 - 1e-6) for k in a)
    assert any(b[k] > a[k] * 1.01 for k in a)


def test_unknown_expert_naming_is_refused_with_the_module_named(tmp_path):
    model = make_tiny_model(tmp_path / "mx", "mixtral")
    f = next(model.glob("*.safetensors"))
    tensors = {k.replace(".w2.", ".w_down."): v for k, v in load_file(str(f)).items()}
    save_file(tensors, str(f), metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match=r"experts 'model.layers.0.block_sparse_moe.experts'"):
        build_skeleton(Checkpoint(model))


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
@pytest.mark.slow
def test_moe_serving_exports_name_every_expert_as_the_checkpoint_does(moe_models, family, tmp_path, calib_text):
    """compressed-tensors (vLLM) and msModelSlim (vllm-ascend) folders: one quantized layer per expert and
    projection under the checkpoint's names (Mixtral's block_sparse_moe.experts.N.w1/w2/w3), routers float."""
    from safetensors import safe_open

    _quantize(moe_models[family], tmp_path / "c", get_scheme("w4a16", group_size=32), calib_text, target="cuda")
    _quantize(moe_models[family], tmp_path / "a", get_scheme("w8a8_dynamic"), calib_text, target="ascend")
    with safe_open(str(next(moe_models[family].glob("*.safetensors"))), "pt") as f:
        source = list(f.keys())
    experts = sorted(k.removesuffix(".weight") for k in source if ".experts." in k)
    routers = sorted(k for k in source if k.endswith(".gate.weight"))
    assert len(experts) == 2 * 4 * 3 and len(routers) == 2

    ct = tmp_path / "c" / "compressed-tensors"
    index = json.loads((ct / "model.safetensors.index.json").read_text())["weight_map"]
    assert all(f"{e}.weight_packed" in index for e in experts)
    assert all(r in index for r in routers)  # float, under its own name
    assert not any(".experts." in i for i in json.loads((ct / "config.json").read_text())["quantization_config"]["ignore"])

    desc = json.loads((tmp_path / "a" / "msmodelslim" / "quant_model_description.json").read_text())
    assert all(desc[f"{e}.weight"] == "W8A8_DYNAMIC" for e in experts)
    assert all(desc[r] == "FLOAT" for r in routers)


@pytest.mark.slow
@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_msmodelslim_loader_runs_moe_exports_as_our_runtime_does(moe_models, family, tmp_path):
    """The ascend v1 loader unfuses transformers' stacked experts as the frontend does, so every expert linear runs
    as its NPU call sequence (it failed on every MoE model: `Qwen3MoeExperts has no attribute '0'`)."""
    from tiny import TEXT
    from transformers import AutoModelForCausalLM

    from qcompiler.runtime.msmodelslim import NpuLinear, load_msmodelslim

    out = tmp_path / "q"
    desc = _quantize(moe_models[family], out, get_scheme("w8a16"), TEXT, target="ascend")
    loaded = load_msmodelslim(out / "msmodelslim")
    members = sum(len(rec.get("fused_from") or [rec]) for rec in desc["layers"].values())
    assert sum(isinstance(m, NpuLinear) for m in loaded.modules()) == members
    ids = torch.randint(3, 250, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, theirs = load_quantized(out)(ids).logits, loaded(ids).logits
        float_logits = AutoModelForCausalLM.from_pretrained(str(moe_models[family]), dtype=torch.float32)(ids).logits
    # the same int8 weights dequantized the same way: equal up to float32 summation order; the float model differs
    assert float((theirs - ours).norm() / ours.norm()) < 1e-5
    assert float((float_logits - ours).norm() / ours.norm()) > 1e-4


def _to_mxfp4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[..., K] float -> (blocks [..., K/32, 16] uint8, scales [..., K/32] uint8), as gpt-oss's release stores its
    experts: one power-of-two scale per 32 values (the smallest that brings the group's largest under 6, E2M1's
    largest), each value the nearest E2M1 code, two codes a byte, low nibble first."""
    from qcompiler.frontends.moe import FP4_E2M1

    g = w.float().reshape(*w.shape[:-1], -1, 32)
    e = torch.ceil(torch.log2(g.abs().amax(-1).clamp_min(2.0 ** -100) / 6))
    codes = ((g / torch.exp2(e)[..., None])[..., None] - torch.tensor(FP4_E2M1)).abs().argmin(-1)
    return (codes[..., 0::2] | (codes[..., 1::2] << 4)).to(torch.uint8), (e + 127).to(torch.uint8)


def test_mxfp4_dequantization_equals_transformers():
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    from qcompiler.frontends.moe import mxfp4_dequantize

    gen = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, 256, (3, 8, 4, 16), generator=gen, dtype=torch.uint8)
    scales = torch.randint(110, 135, (3, 8, 4), generator=gen, dtype=torch.uint8)
    theirs = convert_moe_packed_tensors(blocks, scales)  # [E, K, N]: transformers' transposed expert layout
    assert torch.equal(mxfp4_dequantize(blocks, scales), theirs.transpose(1, 2))
    w = torch.randn(3, 8, 128, generator=gen)
    back = mxfp4_dequantize(*_to_mxfp4(w)).float()  # (the test's own encoder: a round trip within E2M1's steps)
    assert (back - w).abs().max() <= w.abs().amax() / 6 * 1.0 + 1e-6 and torch.equal(
        mxfp4_dequantize(*_to_mxfp4(back)).float(), back)


@pytest.mark.slow
def test_gpt_oss_released_mxfp4_experts_quantize_as_their_dequantized_bf16(tmp_path):
    """gpt-oss ships its experts as MXFP4 blocks and scales (config.json: quantization_config mxfp4), stacked,
    transposed, gate/up interleaved, with biases. Read through the checkpoint's views, that folder quantizes to
    the same bytes as a bf16 folder holding the dequantized experts, and the artefact states no MXFP4."""
    from family_configs import FAMILIES, make_family_model

    from qcompiler.frontends.moe import mxfp4_dequantize

    family = next(f for f in FAMILIES if f.model_type == "gpt_oss")
    plain = make_family_model(tmp_path / "bf16", family)
    released = tmp_path / "mxfp4"
    released.mkdir()
    tensors = load_file(str(plain / "model.safetensors"))
    packed = {}
    for name in [n for n in tensors if n.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
        blocks, scales = _to_mxfp4(tensors[name].transpose(1, 2))  # (stored [E, in, out]; MXFP4 rows are outputs)
        packed[f"{name}_blocks"], packed[f"{name}_scales"] = blocks, scales
        tensors[name] = mxfp4_dequantize(blocks, scales).transpose(1, 2).contiguous()  # bf16, as the release's
    save_file(tensors, str(plain / "model.safetensors"), metadata={"format": "pt"})
    save_file({**{n: t for n, t in tensors.items() if not n.endswith(("_proj",)) or ".experts." not in n}, **packed},
              str(released / "model.safetensors"), metadata={"format": "pt"})
    for f in plain.iterdir():
        if f.name != "model.safetensors":
            (released / f.name).write_bytes(f.read_bytes())
    config = json.loads((released / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn",
                                                                                         "model.layers.*.mlp.router"]}
    (released / "config.json").write_text(json.dumps(config))

    outs = {}
    for folder in (plain, released):
        outs[folder.name] = tmp_path / f"q-{folder.name}"
        quantize(QuantizeConfig(model=folder, scheme=get_scheme("w8a16"), out=outs[folder.name], calib_texts=["x " * 64],
                                num_samples=2, seq_len=32, batch_size=2, progress=False), log=lambda s: None)
    blocks = sorted(p.name for p in outs["bf16"].glob("block-*.safetensors"))
    assert blocks and blocks == sorted(p.name for p in outs["mxfp4"].glob("block-*.safetensors"))
    for name in blocks:
        a, b = load_file(str(outs["bf16"] / name)), load_file(str(outs["mxfp4"] / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert "quantization_config" not in json.loads((outs["mxfp4"] / "config.json").read_text())
    ids = torch.randint(3, 200, (1, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(load_quantized(outs["mxfp4"])(input_ids=ids).logits,
                           load_quantized(outs["bf16"])(input_ids=ids).logits)


@pytest.mark.parametrize("model_type", ["gpt_oss", "llama4_text", "granitemoe", "qwen3_moe"])
def test_experts_read_one_linear_each_compute_transformers_own_block(tmp_path, model_type):
    """The independent check of the expert layouts (the matrix's twin reads experts through these same views):
    transformers' model with its stacked experts, and the same model with the experts replaced by our per-expert
    linears (unfuse_experts) filled from the checkpoint's views — gpt-oss transposed, interleaved, biased with its
    clamped SwiGLU; Llama 4's pre-routed, pre-weighted rows; GraniteMoE's stored input/output_linear; Qwen3-MoE
    concatenated — give the same logits up to float summation order (fp32: 1e-5 relative)."""
    from family_configs import FAMILIES, family_inputs, make_family_model
    from transformers import AutoModelForCausalLM
    from twin import fill_meta_parameters

    from qcompiler.frontends.moe import _is_stacked_experts, unfuse_experts

    family = next(f for f in FAMILIES if f.model_type == model_type)
    folder = make_family_model(tmp_path / model_type, family)
    inputs = family_inputs(family, folder)
    theirs = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    ours = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    ckpt = Checkpoint(folder)
    prefix, _ = find_blocks(ours)
    assert unfuse_experts(ours, ckpt, prefix) == family.fields.get("num_hidden_layers", 2)
    assert not any(_is_stacked_experts(m) for m in ours.modules())
    fill_meta_parameters(ours, ckpt)
    assert not any(p.is_meta for p in ours.parameters())
    with torch.no_grad():
        a, b = ours(**inputs).logits, theirs(**inputs).logits
    assert float((a - b).norm() / b.norm()) < 1e-5

