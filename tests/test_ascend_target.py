"""The `ascend` target: torch_npu emulation, the NPU lowering, the msModelSlim ascend v1 export, and the
comparison with msModelSlim's own output on the same tiny model."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny import TEXT, byte_tokenizer, make_tiny_model

from qcompiler.cli import main
from qcompiler.driver import QuantizeConfig, quantize
from qcompiler.errors import ExportError, SchemeError
from qcompiler.export.layers import ExportLayer
from qcompiler.export.msmodelslim import msmodelslim_tensors
from qcompiler.kernels.ascend import npu_ops
from qcompiler.kernels.packing import pack_int4_pairs, unpack_int4_pairs
from qcompiler.runtime import load_quantized
from qcompiler.runtime.msmodelslim import load_msmodelslim, read_folder
from qcompiler.schemes import get_scheme, parse_override


def _quantize(model: Path, out: Path, scheme: str, group: int | None = None, symmetric: bool | None = None,
              overrides: list[str] = (), act_symmetric: bool | None = None) -> dict:
    s = get_scheme(scheme, group_size=group, symmetric=symmetric, act_symmetric=act_symmetric)
    if overrides:
        s = s.with_overrides([parse_override(o) for o in overrides])
    return quantize(QuantizeConfig(model=model, scheme=s, out=out, target="ascend", calib_texts=[TEXT], num_samples=4,
                                   seq_len=32, batch_size=2, progress=False), log=lambda _: None)


# ---------------------------------------------------------------- the emulated torch_npu kernels


def test_trans_quant_param_keeps_the_fp32_bits_in_int64():
    scale = torch.tensor([0.0123, 3.5e-5, 1.0])
    encoded = npu_ops.npu_trans_quant_param(scale)
    assert encoded.dtype == torch.int64
    assert int(encoded[2]) == 0x3F800000  # 1.0f
    assert torch.equal(npu_ops.decode_scale(encoded), scale)


def test_int4pack_layout_and_roundtrip():
    w = torch.randint(-8, 8, (6, 16), dtype=torch.int32)
    packed = npu_ops.npu_convert_weight_to_int4pack(w)
    assert packed.shape == (6, 2) and packed.dtype == torch.int32
    assert (int(packed[0, 0]) & 0xF) == (int(w[0, 0]) & 0xF)  # value n at bits 4·(n mod 8)
    assert ((int(packed[0, 0]) >> 4) & 0xF) == (int(w[0, 1]) & 0xF)
    assert torch.equal(npu_ops.unpack_int4pack(packed, 16), w)


def test_weight_quant_batchmatmul_adds_its_offset():
    """(w + offset)·scale: the offset is the NEGATED zero point (ŵ = (q − z)·s)."""
    torch.manual_seed(0)
    q = torch.randint(-128, 128, (40, 24), dtype=torch.int8)  # [K, N]
    s, z = torch.rand(2, 24) * 0.01, torch.randint(-5, 5, (2, 24)).float()  # groups of 20 along K
    x = torch.randn(3, 40)
    want = x @ ((q.float() - z.repeat_interleave(20, 0)) * s.repeat_interleave(20, 0))
    got = npu_ops.npu_weight_quant_batchmatmul(x, q, s, -z, None, 20)
    torch.testing.assert_close(got, want)
    assert not torch.allclose(npu_ops.npu_weight_quant_batchmatmul(x, q, s, z, None, 20), want)


def test_quant_matmul_int_bias_before_scale_float_bias_after():
    torch.manual_seed(0)
    a, b = torch.randint(-128, 128, (4, 32), dtype=torch.int8), torch.randint(-128, 128, (32, 8), dtype=torch.int8)
    acc = a.long() @ b.long()
    scale = torch.rand(8) * 1e-3
    qb = torch.randint(-100, 100, (8,), dtype=torch.int32)
    got = npu_ops.npu_quant_matmul(a, b, npu_ops.npu_trans_quant_param(scale), bias=qb, output_dtype=torch.float32)
    torch.testing.assert_close(got, ((acc + qb).double() * scale.double()).float())
    tok = torch.rand(4)
    fb = torch.randn(8)
    got = npu_ops.npu_quant_matmul(a, b, scale, pertoken_scale=tok, bias=fb, output_dtype=torch.float32)
    torch.testing.assert_close(got, (acc.double() * scale.double() * tok.double()[:, None] + fb.double()).float())


def test_int4_pairs_packing():
    q = torch.randint(-8, 8, (6, 10), dtype=torch.int8)
    for dim in (0, 1):
        packed = pack_int4_pairs(q, dim)
        assert packed.shape[dim] == q.shape[dim] // 2
        assert torch.equal(unpack_int4_pairs(packed, dim), q)
    assert int(pack_int4_pairs(q, 1)[0, 0]) & 0xF == int(q[0, 0]) & 0xF  # even index in the low nibble


def test_deq_scale_is_int64_for_fp16_models_and_fp32_for_bf16():
    layer = ExportLayer("l", 16, 4, 8, codes=torch.randint(-127, 128, (4, 16), dtype=torch.int32),
                        scale=torch.rand(4, 1) * 0.01, act="static", input_scale=torch.tensor(0.02),
                        input_zero=torch.tensor(3.0), bias=torch.randn(4))
    kind, t16 = msmodelslim_tensors(layer, bf16_model=False)
    _, tbf = msmodelslim_tensors(layer, bf16_model=True)
    assert kind == "W8A8" and t16["deq_scale"].dtype == torch.int64 and tbf["deq_scale"].dtype == torch.float32
    deq = 0.02 * layer.scale.reshape(-1)
    assert torch.equal(npu_ops.decode_scale(t16["deq_scale"]), deq.float())
    # quant_bias = round(b / deq − z_x·Σ_k q[n, k])
    want = torch.round(layer.bias.double() / deq.double() - 3.0 * layer.codes.double().sum(1)).to(torch.int32)
    assert torch.equal(t16["quant_bias"], want)


# ---------------------------------------------------------------- lowering and export of a tiny model


@pytest.mark.parametrize(("scheme", "group", "symmetric", "ops"), [
    ("w8a8", None, None, {"npu_quantize": 8, "npu_quant_matmul": 8}),
    ("w8a8_dynamic", None, None, {"npu_dynamic_quant": 8, "npu_quant_matmul": 8}),
    ("w4a8", None, None, {"npu_dynamic_quant": 8, "npu_quant_matmul": 8}),
    ("w8a16", None, None, {"npu_weight_quant_batchmatmul": 8}),
    ("w8a16", None, False, {"npu_weight_quant_batchmatmul": 8}),
    ("w4a16", 32, None, {"npu_weight_quant_batchmatmul": 8}),
    ("w4a16", 32, False, {"npu_weight_quant_batchmatmul": 8}),
])
@pytest.mark.slow
def test_npu_lowering_and_export_match_the_reference(tiny_llama, tmp_path, scheme, group, symmetric, ops):
    out = tmp_path / "q"
    _quantize(tiny_llama, out, scheme, group, symmetric)
    ids = torch.randint(3, 250, (2, 24))
    reference = load_quantized(out)(ids).logits

    # structure: every quantized linear became the NPU call sequence (q/k/v and gate/up stay fused: 4 per block)
    npu_model = load_quantized(out, lower_for="npu")
    found: dict[str, int] = {}
    for block in npu_model.model.layers:
        for n in block.gm.graph.nodes:
            assert not (n.op == "call_function" and str(n.target).startswith("qc.linear")), n.format_node()
            if n.op == "call_function" and str(n.target).startswith("qc_npu."):
                name = str(n.target).split(".")[1]
                found[name] = found.get(name, 0) + 1
    assert found == ops

    # numerics: the emulated NPU graph and the exported folder (through the Ascend loaders' steps) = reference
    for logits in (npu_model(ids).logits, load_msmodelslim(out / "msmodelslim")(ids).logits):
        if scheme in ("w8a8", "w8a8_dynamic", "w4a8"):
            # int8 activations: the epilogues round differently (deq_scale = s_x·s_w in fp32, double accumulation)
            # by ~1e-7, which can move a later activation across a rounding tie (one code): rare, small
            assert (logits - reference).norm() / reference.norm() < 2e-3
        else:
            torch.testing.assert_close(logits, reference, rtol=1e-4, atol=1e-4)

    desc, tensors = read_folder(out / "msmodelslim")
    kind = {"w8a8": "W8A8", "w8a8_dynamic": "W8A8_DYNAMIC", "w8a16": "W8A16", "w4a16": "W4A16",
            "w4a8": "W4A8_DYNAMIC"}[scheme]
    # (msModelSlim leaves W4A8_DYNAMIC out of the global type: such a model is "FLOAT" globally)
    assert desc["model_quant_type"] == ("FLOAT" if kind == "W4A8_DYNAMIC" else kind) and desc["version"] == "1.0.0"
    assert desc["group_size"] == (group or 0)
    assert desc["model.layers.0.self_attn.k_proj.weight"] == kind and desc["lm_head.weight"] == "FLOAT"
    assert desc["model.layers.0.input_layernorm.weight"] == "FLOAT"
    w = tensors["model.layers.0.mlp.down_proj.weight"]
    packed_along = {"w4a16": 1 if group is None else 0, "w4a8": 0}.get(scheme)  # int4 pairs in one int8
    assert w.dtype == torch.int8 and w.shape == {None: (96, 160), 0: (48, 160), 1: (96, 80)}[packed_along]
    if scheme == "w4a8":  # scale_bias: [N, 1] for column-parallel layers, [N, 16] for row-parallel ones
        assert tensors["model.layers.0.mlp.down_proj.scale_bias"].shape == (96, 16)
        assert tensors["model.layers.0.mlp.up_proj.scale_bias"].shape == (160, 1)
    config = json.loads((out / "msmodelslim" / "config.json").read_text())
    assert "quantization_config" not in config


@pytest.mark.slow
def test_asymmetric_static_activations_lower_with_offset_and_quant_bias(tiny_llama, tmp_path):
    """input_offset ≠ 0: npu_quantize adds it and quant_bias removes z_x·Σ_k q_w again (the int32 correction)."""
    out = tmp_path / "q"
    _quantize(tiny_llama, out, "w8a8", act_symmetric=False)
    _, tensors = read_folder(out / "msmodelslim")
    offsets = [float(t) for k, t in tensors.items() if k.endswith(".input_offset")]
    assert any(o != 0 for o in offsets) and all(o == round(o) for o in offsets)
    ids = torch.randint(3, 250, (2, 24))
    reference = load_quantized(out)(ids).logits
    for logits in (load_quantized(out, lower_for="npu")(ids).logits, load_msmodelslim(out / "msmodelslim")(ids).logits):
        assert (logits - reference).norm() / reference.norm() < 2e-3
    with pytest.raises(SchemeError, match="no static integer activations"):
        get_scheme("w8a8_dynamic", act_symmetric=False)


def test_fused_group_with_mixed_types_is_refused_and_nothing_is_left(tiny_llama, tmp_path):
    out = tmp_path / "q"
    with pytest.raises(ExportError, match=r"fused group .*self_attn\.q_proj/k_proj/v_proj mixes"):
        _quantize(tiny_llama, out, "w8a16", overrides=["k_proj=float"])
    assert not out.exists() and not list(tmp_path.glob(".q.tmp-*"))


def test_ragged_groups_and_unsupported_schemes_are_refused_before_any_work(tiny_llama, tmp_path):
    out = tmp_path / "q"
    with pytest.raises(SchemeError, match="group size 128 does not divide"):
        _quantize(tiny_llama, out, "w4a16", 128)
    with pytest.raises(SchemeError, match="It runs: w8a16, w4a16, w8a8, w8a8_dynamic"):
        _quantize(tiny_llama, out, "w8a8", symmetric=False)
    assert not out.exists()


def test_cli_quant_for_ascend(tiny_llama, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text(TEXT * 4)
    out = tmp_path / "q"
    assert main(["quant", "--model", str(tiny_llama), "--scheme", "w8a8", "--target", "ascend", "--out", str(out),
                 "--calib-text", str(text), "--num-samples", "4", "--seq-len", "32", "--no-progress"]) == 0
    assert (out / "msmodelslim" / "quant_model_description.json").is_file()
    assert (out / "msmodelslim" / "tokenizer.json").is_file() and (out / "qcompiler.json").is_file()


# ---------------------------------------------------------------- against msModelSlim's own output

# msModelSlim configs for static W8A8 and W4A8_DYNAMIC on a default model (its CLI has no quant type for them)
MSMODELSLIM_CONFIGS = Path(__file__).parent.parent / "benchmarks" / "peers"


@pytest.fixture(scope="module")
def ms_model(tmp_path_factory) -> Path:
    """A tiny Llama msModelSlim can read (its calibration pads batches: the tokenizer needs a pad token)."""
    path = make_tiny_model(tmp_path_factory.mktemp("ms") / "llama", "llama", hidden_size=128, intermediate_size=256,
                           head_dim=32)
    tok = byte_tokenizer()
    tok.pad_token = "</s>"
    tok.save_pretrained(str(path))
    return path


def _msmodelslim(model: Path, out: Path, quant_type: str | None = None, config: Path | None = None) -> Path:
    exe = shutil.which("msmodelslim")
    if exe is None:
        pytest.skip("msmodelslim (PyPI, 26.1.0) is not installed")
    args = [exe, "quant", "--model_type", "default", "--model_path", str(model), "--save_path", str(out),
            "--device", "cpu"]
    args += ["--config_path", str(config)] if config else ["--quant_type", quant_type]  # type: ignore[list-item]
    r = subprocess.run(args, input="y\n", capture_output=True, text=True, timeout=600, cwd=out.parent)
    assert r.returncode == 0 and (out / "quant_model_description.json").is_file(), r.stdout[-2000:] + r.stderr[-2000:]
    return out


def _layout(folder: Path) -> dict[str, tuple[str, torch.dtype, tuple[int, ...]]]:
    desc, tensors = read_folder(folder)
    return {k: (desc[k], t.dtype, tuple(t.shape)) for k, t in tensors.items()}


@pytest.mark.parametrize(("ours", "theirs"), [("w8a8", "static"), ("w8a8_dynamic", "w8a8"), ("w8a16", "w8a16"),
                                             ("w4a8", "w4a8_dynamic")])
@pytest.mark.slow
def test_same_layout_as_msmodelslim_and_its_numbers_agree_with_our_emulation(ms_model, tmp_path, ours, theirs):
    yaml = {"static": "msmodelslim_w8a8_static.yaml", "w4a8_dynamic": "msmodelslim_w4a8_dynamic.yaml"}.get(theirs)
    config = MSMODELSLIM_CONFIGS / yaml if yaml else None
    their_dir = _msmodelslim(ms_model, tmp_path / "theirs", quant_type=None if config else theirs, config=config)
    out = tmp_path / "ours"
    _quantize(ms_model, out, ours)
    our_dir = out / "msmodelslim"

    # files: the same tensor names, dtypes, shapes and description types; the same global keys
    assert _layout(our_dir) == _layout(their_dir)
    our_desc, their_desc = read_folder(our_dir)[0], read_folder(their_dir)[0]
    globals_ = ("model_quant_type", "version", "group_size", "metadata", "optional")
    assert {k: our_desc[k] for k in globals_} == {k: their_desc[k] for k in globals_}
    assert {p.name for p in our_dir.iterdir()} >= {"quant_model_description.json", "config.json",
                                                    "quant_model_weights.safetensors.index.json"}

    # numbers: msModelSlim's files run through our emulated NPU kernels (as vllm-ascend loads them) give the
    # float model's logits up to 8-bit quantization error, like ours; a wrong sign convention would not
    from transformers import AutoModelForCausalLM

    ids = torch.randint(3, 250, (2, 32))
    with torch.no_grad():
        float_logits = AutoModelForCausalLM.from_pretrained(str(ms_model), dtype=torch.float32)(ids).logits

    def rel(model: torch.nn.Module) -> float:
        with torch.no_grad():
            return float((model(ids).logits - float_logits).norm() / float_logits.norm())

    # per-tensor static activations on this model's outlier channels cost more than per-token or weight-only;
    # int4 per-channel weights of random Gaussian matrices much more (both tools ≈ 0.45-0.5 here; garbage ≥ 1)
    bound = {"static": 0.3, "w4a8_dynamic": 0.7}.get(theirs, 0.05)
    err_theirs, err_ours = rel(load_msmodelslim(their_dir)), rel(load_msmodelslim(our_dir))
    assert err_theirs < bound and err_ours < bound, (err_theirs, err_ours)
    if theirs == "w4a8_dynamic":  # their int4 pairs decode, by our reading of the layout, to the float weights
        from safetensors.torch import load_file as load

        files = {}
        for f in their_dir.glob("quant_model_weights-*.safetensors"):
            files.update(load(str(f)))
        w = AutoModelForCausalLM.from_pretrained(str(ms_model)).model.layers[0].mlp.down_proj.weight.detach()
        packed, scale = files["model.layers.0.mlp.down_proj.weight"], files["model.layers.0.mlp.down_proj.weight_scale"]
        assert float((unpack_int4_pairs(packed, 0).float() * scale - w).norm() / w.norm()) < 0.2
        assert float((unpack_int4_pairs(packed, 1).reshape(w.shape).float() * scale - w).norm() / w.norm()) > 1
    if theirs == "static":  # their activations are asymmetric: input_offset ≠ 0 exercises the offset convention
        assert float(load_file(str(next(their_dir.glob("quant_model_weights-*.safetensors"))))
                     ["model.layers.0.self_attn.q_proj.input_offset"].abs()) > 0
        broken = their_dir.parent / "broken"
        shutil.copytree(their_dir, broken)
        shard = next(broken.glob("quant_model_weights-*.safetensors"))
        from safetensors.torch import save_file

        t = load_file(str(shard))
        for k in [k for k in t if k.endswith("input_offset")]:
            t[k] = -t[k]
        save_file(t, str(shard))
        assert rel(load_msmodelslim(broken)) > 4 * err_theirs


def test_mixed_types_and_float_fallback_layers(tiny_llama, tmp_path):
    """Per-layer schemes: W8A8 with down_proj W8A16 and o_proj kept float (FLOAT in the description, its float
    weight in the files); the model type is the highest-priority type present; numerics = reference."""
    out = tmp_path / "q"
    _quantize(tiny_llama, out, "w8a8", overrides=["down=w8a16", "o_proj=float"])
    desc, tensors = read_folder(out / "msmodelslim")
    assert desc["model.layers.1.mlp.down_proj.weight"] == "W8A16"
    assert desc["model.layers.1.self_attn.q_proj.deq_scale"] == "W8A8"
    assert desc["model.layers.1.self_attn.o_proj.weight"] == "FLOAT"
    assert tensors["model.layers.1.self_attn.o_proj.weight"].dtype == torch.float32
    assert desc["model_quant_type"] == "W8A8"
    ids = torch.randint(3, 250, (2, 24))
    reference = load_quantized(out)(ids).logits
    got = load_msmodelslim(out / "msmodelslim")(ids).logits
    assert (got - reference).norm() / reference.norm() < 2e-3


def test_npu_lowering_refuses_what_it_cannot_run(tiny_llama, tmp_path):
    from qcompiler.errors import ArtifactError
    from qcompiler.kernels.ascend import layout

    with pytest.raises(ValueError, match="'WFP8AFP8_DYNAMIC' has no NPU lowering here.*W4A4_FLATQUANT_DYNAMIC"):
        layout.prepare("WFP8AFP8_DYNAMIC", {}, 0)
    out = tmp_path / "q"
    _quantize(tiny_llama, out, "w8a16")
    with pytest.raises(ArtifactError, match="unknown runtime lowering 'gpu'"):
        load_quantized(out, lower_for="gpu")
