"""The onnxruntime target: MatMulNBits packing against an independent reading of the format, the exported
decoder (structure, onnx.checker, logits vs our reference runtime, KV cache, genai generation) and refusals."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper
from tiny import TEXT, make_tiny_model
from twin import transformers_twin

from qcompiler.driver import QuantizeConfig, quantize
from qcompiler.errors import ExportError, SchemeError
from qcompiler.export.onnx.emit import matmulnbits_block, matmulnbits_tensors
from qcompiler.kernels import reference
from qcompiler.kernels.packing import store_weight_codes
from qcompiler.numerics import quantize_weight, weight_qparams
from qcompiler.runtime import load_quantized
from qcompiler.runtime.onnxruntime import OrtCausalLM
from qcompiler.schemes import QuantArgs, get_scheme


# ------------------------------------------------------------------ MatMulNBits layout
def _unpack_matmulnbits(b: np.ndarray, scales: np.ndarray, zp: np.ndarray | None, bits: int, block: int,
                        k: int) -> np.ndarray:
    """Dequantize MatMulNBits tensors as FORMATS.md describes them (written independently of the packer):
    B [N, kb, block·bits/8] low bits first along K, scales [N·kb], zero points packed per row, default 2^(bits−1)."""
    n, kb, _ = b.shape
    if bits == 4:
        codes = np.stack([b & 0x0F, b >> 4], axis=-1).reshape(n, kb * block)
    else:
        codes = b.reshape(n, kb * block)
    if zp is None:
        z = np.full((n, kb), 2 ** (bits - 1))
    elif bits == 4:
        per_row = (kb + 1) // 2
        zb = zp.reshape(n, per_row)
        z = np.stack([zb & 0x0F, zb >> 4], axis=-1).reshape(n, per_row * 2)[:, :kb]
    else:
        z = zp.reshape(n, kb)
    s = scales.reshape(n, kb)
    w = (codes.reshape(n, kb, block).astype(np.float64) - z[:, :, None]) * s[:, :, None]
    return w.reshape(n, kb * block)[:, :k]


@pytest.mark.parametrize("bits,symmetric,group,k", [(4, True, 32, 70), (4, False, 32, 70), (4, False, 16, 96),
                                                    (8, True, 64, 130), (8, False, 32, 64), (4, True, None, 70),
                                                    (4, False, 96, 200)])
def test_matmulnbits_tensors_match_an_independent_unpacker_and_onnxruntime(bits, symmetric, group, k):
    torch.manual_seed(0)
    n = 33
    w = torch.randn(n, k)
    args = QuantArgs(bits=bits, symmetric=symmetric, granularity="group" if group else "channel", group_size=group)
    scale, zero = weight_qparams(w, args)
    stored = store_weight_codes(quantize_weight(w, scale, zero, args), bits, symmetric)
    g = group or k
    ref_w = reference.dequantize(stored, scale, zero, bits, g, k)
    block, b, s, zp = matmulnbits_tensors(stored, scale, zero, bits, g, k)
    assert block == matmulnbits_block(g, k) and block >= 16 and block & (block - 1) == 0
    assert b.shape == (n, -(-k // block), block * bits // 8) and b.dtype == np.uint8
    assert (zp is None) == symmetric
    np.testing.assert_allclose(_unpack_matmulnbits(b, s, zp, bits, block, k), ref_w.double().numpy(), rtol=0, atol=1e-6)

    # the same tensors through onnxruntime's kernel (float compute) equal our reference linear
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, k])]
    inits = [onnx.numpy_helper.from_array(b, "B"), onnx.numpy_helper.from_array(s, "scales")]
    names = ["x", "B", "scales"]
    if zp is not None:
        inits.append(onnx.numpy_helper.from_array(zp, "zp"))
        names.append("zp")
    node = helper.make_node("MatMulNBits", names, ["y"], domain="com.microsoft", K=k, N=n, bits=bits,
                            block_size=block, accuracy_level=0)
    graph = helper.make_graph([node], "g", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, n])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)],
                              ir_version=10)
    x = torch.randn(3, k)
    y = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x.numpy()})[0]
    expect = reference.linear_woq(x, stored, scale, zero, None, bits, g, k)
    torch.testing.assert_close(torch.from_numpy(y), expect, rtol=1e-5, atol=1e-5)


def test_group_sizes_without_a_power_of_two_block_are_refused_by_the_target():
    from qcompiler.targets import get_target

    t = get_target("onnxruntime")
    assert matmulnbits_block(24, 96) is None
    assert "power of two" in (t.unsupported_reason(get_scheme("w4a16", group_size=24)) or "")
    assert t.unsupported_reason(get_scheme("w4a16", group_size=96)) is None  # blocks of 32, scales repeated
    with pytest.raises(SchemeError, match="lm_head_bits"):
        t.check_options({"lm_head_bits": "3"})


# ------------------------------------------------------------------ the exported decoder
@pytest.fixture(scope="module")
def tiny32(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ort_models")
    models = {f: make_tiny_model(root / f, f, head_dim=32) for f in ("llama", "qwen2", "qwen3")}
    # google/gemma-2b: embeddings scaled by √hidden, (1 + w) norms, gelu-tanh MLP, a tied head
    models["gemma"] = make_tiny_model(root / "gemma", "gemma", head_dim=32, tie_word_embeddings=True)
    # a sliding window shorter than the test sequences: GroupQueryAttention's local_window_size must match HF's
    models["mistral"] = make_tiny_model(root / "mistral", "mistral", head_dim=32, sliding_window=8)
    return models


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().norm() / b.detach().norm())


def _quantize(model: Path, out: Path, scheme: str, **opts: str) -> dict:
    s = get_scheme(scheme, group_size=32) if scheme.startswith("w4") else get_scheme(scheme)
    return quantize(QuantizeConfig(model=model, scheme=s, out=out, target="onnxruntime", calib_texts=[TEXT],
                                   num_samples=4, seq_len=32, batch_size=2, progress=False, target_options=opts),
                    log=lambda _: None)


@pytest.mark.parametrize("family,scheme", [("llama", "w4a16"), ("qwen2", "w4a16"), ("mistral", "w4a16"), ("llama", "w8a16"),
                                           ("llama", "w8a8_dynamic"), ("qwen2", "w8a8"), ("qwen3", "w4a16"),
                                           ("qwen3", "w8a8_dynamic"), ("gemma", "w4a16")])
@pytest.mark.slow
def test_exported_decoder_matches_the_reference_runtime(tiny32, tmp_path, family, scheme):
    out = tmp_path / "q"
    _quantize(tiny32[family], out, scheme, accuracy_level="0", lm_head_bits="float", w8a8_dynamic="exact")
    onnx.checker.check_model(str(out / "model.onnx"), full_check=True)
    # weights live in the page-aligned external data file, never in the protobuf (no 2 GB limit)
    proto = onnx.load(str(out / "model.onnx"), load_external_data=False)
    big = [t for t in proto.graph.initializer if int(np.prod(t.dims)) * 4 > 4096]
    assert big and all(t.data_location == TensorProto.EXTERNAL for t in big)
    assert all(int(e.value) % 4096 == 0 for t in big for e in t.external_data if e.key == "offset")
    ops = Counter(n.op_type for n in onnx.load(str(out / "model.onnx"), load_external_data=False).graph.node)
    layers = 2
    assert ops["GroupQueryAttention"] == layers
    # the first norm reads the embedding; every later one is fused with the residual add before it
    # (Qwen3: its per-head q and k norms run before GroupQueryAttention, two more per layer)
    assert ops["RMSNormalization"] == 1 + (2 * layers if family == "qwen3" else 0)
    assert ops["SkipSimplifiedLayerNormalization"] == 2 * layers
    if scheme.endswith("a16"):  # fused qkv, o, fused gate|up, down per block
        assert ops["MatMulNBits"] == 4 * layers
    elif scheme == "w8a8_dynamic":
        assert ops["MatMulInteger"] == 4 * layers and ops["MatMulNBits"] == 0
    else:
        assert ops["QuantizeLinear"] == 4 * layers
    ids = torch.randint(3, 250, (2, 24))
    ref = load_quantized(out)(input_ids=ids).logits
    m = OrtCausalLM(out)
    got = m(ids).logits
    # prefill 16 tokens, then decode one token at a time through the KV cache
    _, past = m.run(ids[:, :16].numpy())
    steps = []
    for t in range(16, 24):
        logits, past = m.run(ids[:, t:t + 1].numpy(), past)
        steps.append(logits)
    decoded = torch.from_numpy(np.concatenate(steps, axis=1))
    if scheme.endswith("a16"):
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=2e-4)
        torch.testing.assert_close(decoded, got[:, 16:], rtol=1e-4, atol=2e-4)
    else:
        # Quantized activations: onnxruntime's fused norms and kernels round differently from torch in the last
        # ulp, so now and then an activation at a rounding tie takes the neighbouring code (one step, s_x·w) — a
        # CPU-dependent, sparse difference. Bound: far below what the activation grids move the logits at all.
        grids = _rel(transformers_twin(tiny32[family], out, activations=False)(input_ids=ids).logits, ref)
        assert _rel(got, ref) < grids / 10 and _rel(decoded, got[:, 16:]) < grids / 10, grids


@pytest.mark.slow
def test_rotated_decoder_with_online_hadamards_matches_the_reference_runtime(tiny32, tmp_path):
    """QuaRot's online Hadamards before o_proj and down_proj (the rotate pass) are MatMuls in the exported decoder:
    o_proj's sits between GroupQueryAttention's output and the projection. Weight-only int8: the same function."""
    from qcompiler.pm.pipeline import parse_pipeline

    out = tmp_path / "q"
    desc = quantize(QuantizeConfig(model=tiny32["llama"], scheme=get_scheme("w8a16"), out=out, target="onnxruntime",
                                   calib_texts=[TEXT], num_samples=4, seq_len=32, batch_size=2, progress=False,
                                   passes=parse_pipeline("rotate,fuse_linears,rtn,quantize_head,lower"),
                                   target_options={"accuracy_level": "0", "lm_head_bits": "float"}),
                    log=lambda _: None)
    online = {block: rep["passes"]["rotate"]["online"] for block, rep in desc["block_report"].items()}
    assert all(v == ["self_attn.o_proj", "mlp.down_proj"] for v in online.values()), online
    graph = onnx.load(str(out / "model.onnx"), load_external_data=False).graph
    hadamards = [n for n in graph.node if n.op_type == "MatMul" and any(i.startswith("hadamard_") for i in n.input)]
    assert len(hadamards) == 2 * 2  # two per block
    ids = torch.randint(3, 250, (2, 24), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(OrtCausalLM(out)(ids).logits, load_quantized(out)(input_ids=ids).logits,
                               rtol=1e-4, atol=2e-4)


def test_accuracy_level_4_and_quantized_head_stay_close_and_shrink_the_file(tiny32, tmp_path):
    exact, fast = tmp_path / "exact", tmp_path / "fast"
    _quantize(tiny32["llama"], exact, "w4a16", accuracy_level="0", lm_head_bits="float")
    _quantize(tiny32["llama"], fast, "w4a16")  # defaults: accuracy_level 4, int8 head
    ids = torch.randint(3, 250, (1, 24))
    a, b = OrtCausalLM(exact)(ids).logits, OrtCausalLM(fast)(ids).logits
    rel = float((a - b).norm() / a.norm())
    assert 0 < rel < 0.05  # int8 activations inside MatMulNBits + int8 head: small, not zero
    ops = Counter(n.op_type for n in onnx.load(str(fast / "model.onnx"), load_external_data=False).graph.node)
    assert ops["MatMulNBits"] == 4 * 2 + 1 and ops["Gemm"] == 0
    assert (fast / "model.onnx.data").stat().st_size < (exact / "model.onnx.data").stat().st_size


def test_w8a8_dynamic_default_uses_the_int8_matmulnbits_kernel_within_tolerance(tiny32, tmp_path):
    out = tmp_path / "q"
    _quantize(tiny32["llama"], out, "w8a8_dynamic", lm_head_bits="float")
    graph = onnx.load(str(out / "model.onnx"), load_external_data=False).graph
    nbits = [n for n in graph.node if n.op_type == "MatMulNBits"]
    assert len(nbits) == 4 * 2 and not [n for n in graph.node if n.op_type == "MatMulInteger"]
    assert all({a.name: a.i for a in n.attribute}["bits"] == 8 and {a.name: a.i for a in n.attribute}["accuracy_level"] == 4
               for n in nbits)
    ids = torch.randint(3, 250, (1, 24))
    ref = load_quantized(out)(input_ids=ids).logits
    rel = float((OrtCausalLM(out)(ids).logits - ref).norm() / ref.norm())
    assert 0 < rel < 0.03  # per-token-per-block activations instead of per-token: close, not equal


@pytest.mark.slow
def test_tied_embedding_shares_the_quantized_head_table(tmp_path):
    model = make_tiny_model(tmp_path / "tied", "llama", head_dim=32, tie_word_embeddings=True)
    out = tmp_path / "q"
    _quantize(model, out, "w8a16", accuracy_level="0")  # int8 head (default) serves the embedding lookup too
    graph = onnx.load(str(out / "model.onnx"), load_external_data=False).graph
    ops = Counter(n.op_type for n in graph.node)
    assert ops["GatherBlockQuantized"] == 1 and ops["Gather"] == 1  # (the other Gather reads a shape)
    assert not [t for t in graph.initializer if t.name == "model.embed_tokens.weight"]
    ids = torch.randint(3, 250, (1, 20))
    ref = load_quantized(out)(input_ids=ids).logits
    got = OrtCausalLM(out)(ids).logits
    # the quantize_head pass gave our artefact the same int8 head and (tied) embedding: equal up to float rounding
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=2e-4)
    float_head = tmp_path / "f"
    _quantize(model, float_head, "w8a16", accuracy_level="0", lm_head_bits="float")  # Gemm(transB) on the table
    assert Counter(n.op_type for n in onnx.load(str(float_head / "model.onnx"), load_external_data=False).graph.node)["Gemm"] == 1
    float_ref = load_quantized(float_head)(input_ids=ids).logits
    torch.testing.assert_close(OrtCausalLM(float_head)(ids).logits, float_ref, rtol=1e-4, atol=2e-4)
    assert float((float_ref - ref).norm() / ref.norm()) > 1e-4  # (the int8 head is a real difference)


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma"])
def test_onnxruntime_genai_generates_the_same_greedy_tokens(tiny32, tmp_path, family):
    og = pytest.importorskip("onnxruntime_genai")
    out = tmp_path / "q"
    _quantize(tiny32[family], out, "w4a16", accuracy_level="0", lm_head_bits="float")
    model = og.Model(str(out))
    prompt = [1, 40, 41, 42, 43, 44]
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt) + 12, do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens(prompt)
    while not gen.is_done():
        gen.generate_next_token()
    genai_tokens = list(gen.get_sequence(0))
    # greedy decoding with our reference runtime
    ref = load_quantized(out)
    ids = torch.tensor([prompt])
    while ids.shape[1] < len(genai_tokens):
        nxt = ref(input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], dim=1)
        if int(nxt) == 2:  # eos
            break
    assert genai_tokens == ids[0].tolist()


def test_unsupported_models_are_refused_before_anything_is_written(tmp_path, tiny_models, monkeypatch):
    from qcompiler.export.onnx import decoder

    out = tmp_path / "q"
    with pytest.raises(ExportError, match="head size divisible by 16"):
        _quantize(tiny_models["llama"], out, "w4a16")  # head_dim 24
    with pytest.raises(ExportError, match="no decoder for 'deepseek_v2'"):  # (MLA: keys, values of other head sizes)
        _quantize(make_tiny_model(tmp_path / "deepseek_v2", "deepseek_v2"), out, "w4a16")
    # past the architecture list, the export itself refuses what it cannot rotate with: DeepSeek V2's rotary module
    # returns one complex tensor, not (cos, sin) tables
    monkeypatch.setattr(decoder, "SUPPORTED_ARCHITECTURES", (*decoder.SUPPORTED_ARCHITECTURES, "deepseek_v2"))
    with pytest.raises(ExportError, match="returns Tensor, not the \\(cos, sin\\) tables"):
        _quantize(make_tiny_model(tmp_path / "deepseek_v2", "deepseek_v2"), out, "w4a16")
    assert not out.exists() and not list(tmp_path.glob(".q.tmp-*"))


def test_longrope_switches_to_its_long_factors_past_the_original_length(tmp_path):
    """Longrope (Phi-3.5-mini's scaling, here switching past 16 tokens): a prompt within the original length rotates
    with the short factors, a longer one with the long factors (both equal to the reference runtime, which recomputes
    the whole sequence), and decoding past the switch rotates the new tokens with the long factors while the cached
    keys keep their short rotation — transformers' own cached decoding (the twin with its cache), step by step."""
    longrope = dict(rope_type="longrope", short_factor=[1.0] * 16, long_factor=[4.0] * 16,
                    original_max_position_embeddings=16)
    model = make_tiny_model(tmp_path / "phi3", "phi3", hidden_size=128, head_dim=32, rope_scaling=longrope,
                            max_position_embeddings=64, original_max_position_embeddings=16)
    from transformers import AutoModelForCausalLM

    sharp = AutoModelForCausalLM.from_pretrained(str(model), dtype=torch.float32)
    with torch.no_grad():  # (queries and keys 10× larger: attention that the rotation moves, so the checks can fail)
        for layer in sharp.model.layers:
            layer.self_attn.qkv_proj.weight[:2 * 128].mul_(10.0)
    sharp.save_pretrained(str(model))
    out = tmp_path / "q"
    _quantize(model, out, "w8a16", accuracy_level="0", lm_head_bits="float")
    graph = onnx.load(str(out / "model.onnx"), load_external_data=False).graph
    gqa = [n for n in graph.node if n.op_type == "GroupQueryAttention"]
    assert gqa and all(len(n.input) > 9 and n.input[9] for n in gqa)  # (position_ids: the rows to rotate with)
    cos = next(i for i in graph.initializer if i.name.startswith("cos_cache"))
    assert cos.dims[0] == 2 * 64  # short then long tables
    ids = torch.randint(3, 250, (1, 40), generator=torch.Generator().manual_seed(0))
    ours, m = load_quantized(out), OrtCausalLM(out)
    for length in (12, 40):  # within, past the original length
        torch.testing.assert_close(m(ids[:, :length]).logits, ours(input_ids=ids[:, :length]).logits,
                                   rtol=1e-4, atol=2e-4)
    twin = transformers_twin(model, out)
    with torch.no_grad():
        cached = twin(input_ids=ids[:, :12], use_cache=True)
        past_hf, expect = cached.past_key_values, []
        for t in range(12, 24):
            step = twin(input_ids=ids[:, t:t + 1], past_key_values=past_hf, use_cache=True)
            past_hf = step.past_key_values
            expect.append(step.logits)
    _, past = m.run(ids[:, :12].numpy())
    steps = []
    for t in range(12, 24):
        logits, past = m.run(ids[:, t:t + 1].numpy(), past)
        steps.append(logits)
    np.testing.assert_allclose(np.concatenate(steps, axis=1), torch.cat(expect, dim=1).numpy(), rtol=1e-4, atol=2e-4)
    # past the switch, cached keys keep their short rotation: not what a recomputation of the whole sequence gives
    assert _rel(torch.from_numpy(steps[-1]), ours(input_ids=ids[:, :24]).logits[:, -1:]) > 1e-3


@pytest.mark.parametrize("family", [
    "hunyuan_v1_dense",  # q/k RMSNorms after the rotary embedding
    "gpt_neox",  # 4 of 16 dims rotated, heads interleaved in the fused qkv projection
])
def test_heads_the_op_cannot_rotate_are_rotated_in_the_graph(tmp_path, family):
    """Where GroupQueryAttention cannot rotate the heads itself (a norm after the rotation, a rotated part that is not
    a multiple of 16 dims), the block's own q/k arithmetic is exported with the model's cos/sin tables gathered at
    each token's position, and the op runs with do_rotary=0 on rotated inputs. Positions must be right on all three
    of GroupQueryAttention's paths: a right-padded first prompt (s), single-token decoding and a chunk after cached
    tokens (seqlens_k + 1 − S + s): each equals the reference runtime on the same tokens."""
    from family_configs import BY_TYPE, make_family_model

    model = make_family_model(tmp_path / family, BY_TYPE[family])  # (the matrix's tiny configs of the real ones)
    out = tmp_path / "q"
    _quantize(model, out, "w8a16", accuracy_level="0", lm_head_bits="float")
    graph = onnx.load(str(out / "model.onnx"), load_external_data=False).graph
    gqa = [n for n in graph.node if n.op_type == "GroupQueryAttention"]
    assert gqa and all(a.i == 0 for n in gqa for a in n.attribute if a.name == "do_rotary")
    tables = {i.name for i in graph.initializer}
    assert {"cos_table", "sin_table"} <= tables and not any(n.startswith("cos_cache") for n in tables)
    ids = torch.randint(3, 250, (2, 20), generator=torch.Generator().manual_seed(0))
    ref = load_quantized(out)(input_ids=ids).logits
    m = OrtCausalLM(out)
    torch.testing.assert_close(m(ids).logits, ref, rtol=1e-4, atol=2e-4)
    padded = ids.clone()
    padded[1, 14:] = 0
    mask = np.ones((2, 20), np.int64)
    mask[1, 14:] = 0
    logits, _ = m.run(padded.numpy(), mask=mask)
    short = load_quantized(out)(input_ids=ids[1:, :14]).logits
    np.testing.assert_allclose(logits[1, :14], short[0].numpy(), rtol=1e-4, atol=2e-4)
    _, past = m.run(ids[:, :16].numpy())
    steps = []
    for t in range(16, 20):
        logits, past = m.run(ids[:, t:t + 1].numpy(), past)
        steps.append(logits)
    np.testing.assert_allclose(np.concatenate(steps, axis=1), ref[:, 16:].numpy(), rtol=1e-4, atol=2e-4)
    _, past = m.run(ids[:1, :10].numpy())  # (onnxruntime takes a chunk after cached tokens at batch size 1 only)
    chunk, _ = m.run(ids[:1, 10:16].numpy(), past)
    np.testing.assert_allclose(chunk, ref[:1, 10:16].numpy(), rtol=1e-4, atol=2e-4)


def test_cli_quant_for_onnxruntime_and_eval_through_it(tiny32, tmp_path, capsys):
    from qcompiler.cli import main

    text = tmp_path / "t.txt"
    text.write_text(TEXT * 4)
    out = tmp_path / "q"
    assert main(["quant", "--model", str(tiny32["llama"]), "--scheme", "w8a16", "--target", "onnxruntime",
                 "--target-option", "lm_head_bits=float", "--out", str(out), "--calib-text", str(text),
                 "--num-samples", "4", "--seq-len", "32", "--no-progress"]) == 0
    assert (out / "model.onnx").is_file() and (out / "genai_config.json").is_file()
    capsys.readouterr()
    assert main(["eval", str(out), "--text", str(text), "--seq-len", "32", "--max-tokens", "256", "--json"]) == 0
    import json

    r = json.loads(capsys.readouterr().out)
    assert r["runtime"] == "onnxruntime"
    assert r["quantized"]["perplexity"] == pytest.approx(r["float"]["perplexity"], rel=0.05)
    assert main(["quant", "--model", str(tiny32["llama"]), "--scheme", "w4a16", "--target", "onnxruntime",
                 "--target-option", "speed=max", "--out", str(tmp_path / "x")]) == 2


@pytest.mark.slow
def test_gemma2_eager_attention_with_soft_capping_runs_as_group_query_attention(tmp_path):
    """Gemma 2 runs transformers' eager attention (soft-capping: SDPA cannot express it); the export finds
    softmax(c·tanh(s·q·kᵀ / c) + mask)·v on the graph and writes GroupQueryAttention with softcap = c, the final
    logits capped the same way. Caps small enough to bend these tiny models' scores and logits (google/gemma-2-2b:
    50 and 30) make both matter: prefill and cached decode equal the reference runtime."""
    model = make_tiny_model(tmp_path / "gemma2", "gemma2", head_dim=32, tie_word_embeddings=True, sliding_window=8,
                            layer_types=["sliding_attention", "full_attention"], query_pre_attn_scalar=32,
                            attn_logit_softcapping=0.5, final_logit_softcapping=4.0)
    out = tmp_path / "q"
    _quantize(model, out, "w8a16", accuracy_level="0", lm_head_bits="float")
    graph = onnx.load(str(out / "model.onnx"), load_external_data=False).graph
    caps = [a.f for n in graph.node if n.op_type == "GroupQueryAttention" for a in n.attribute if a.name == "softcap"]
    assert caps == [0.5, 0.5]
    ids = torch.randint(3, 250, (2, 24), generator=torch.Generator().manual_seed(0))
    ref = load_quantized(out)(input_ids=ids).logits
    assert 2.0 < float(ref.abs().max()) <= 4.0  # (the final cap bounds them, and bends the largest)
    m = OrtCausalLM(out)
    torch.testing.assert_close(m(ids).logits, ref, rtol=1e-4, atol=2e-4)
    _, past = m.run(ids[:, :16].numpy())  # prefill, then decode one token at a time through the KV cache (and the window)
    steps = []
    for t in range(16, 24):
        logits, past = m.run(ids[:, t:t + 1].numpy(), past)
        steps.append(logits)
    np.testing.assert_allclose(np.concatenate(steps, axis=1), ref[:, 16:].numpy(), rtol=1e-4, atol=2e-4)
