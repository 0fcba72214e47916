"""The `cuda` target's exports: compressed-tensors reloaded by its real client (transformers + the
compressed-tensors package, on the CPU), AWQ and GPTQ against unpackers written from the format description."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny import TEXT

from qcompiler.cli import main
from qcompiler.driver import QuantizeConfig, quantize
from qcompiler.errors import SchemeError
from qcompiler.export.layers import from_record
from qcompiler.ir.records import LayerRecord
from qcompiler.kernels.packing import pack_int32
from qcompiler.runtime import load_quantized
from qcompiler.schemes import get_scheme

ct = pytest.importorskip("compressed_tensors", reason="the `export` extra (compressed-tensors) is not installed")


def _quantize(model: Path, out: Path, scheme: str, group: int | None = 32, symmetric: bool | None = None,
              algo: str = "rtn", **opts: str) -> dict:
    s = get_scheme(scheme, group_size=group if scheme.startswith("w4") else None, symmetric=symmetric)
    return quantize(QuantizeConfig(model=model, scheme=s, out=out, target="cuda", calib_texts=[TEXT], num_samples=4,
                                   seq_len=32, batch_size=2, progress=False, target_options=opts, algo=algo),
                    log=lambda _: None)


def _files(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _our_layers(out: Path) -> dict[str, torch.Tensor]:
    """Every original layer's dequantized weight, read from our own artefact (the oracle)."""
    desc = json.loads((out / "qcompiler.json").read_text())
    tensors = _files(out)
    return {layer.name: layer.dequantized() for rec in desc["layers"].values()
            for layer in from_record(LayerRecord.from_dict(rec), tensors)}


def _unpack_int32(words: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Written from the description: element j of a row sits at bits b·j of the row's little-endian bit string."""
    per = 32 // bits
    w = words.to(torch.int64) & 0xFFFFFFFF
    cols = [(w >> (bits * i)) & (2**bits - 1) for i in range(per)]
    return torch.stack(cols, dim=-1).reshape(words.shape[0], -1)[:, :count]


@pytest.mark.parametrize("bits", [4, 8])
def test_pack_int32_matches_the_description_and_compressed_tensors(bits):
    torch.manual_seed(0)
    values = torch.randint(0, 2**bits, (5, 37))  # ragged: 37 values do not fill the last word
    packed = pack_int32(values, bits)
    assert packed.dtype == torch.int32 and packed.shape == (5, -(-37 * bits // 32))
    assert torch.equal(_unpack_int32(packed, bits, 37), values)
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    signed = unpack_from_int32(packed, bits, torch.Size([5, 37]))  # the client's unpacker (offsets by 2^(b-1))
    assert torch.equal(signed.to(torch.int64) + 2 ** (bits - 1), values)


@pytest.mark.parametrize(("scheme", "group", "symmetric"), [
    ("w4a16", 32, None), ("w4a16", 0, None), ("w8a16", None, None), ("w8a8", None, None), ("fp8", None, None),
    ("fp8_static", None, None),
])
def test_compressed_tensors_reloads_in_transformers_with_our_numbers(tiny_llama, tmp_path, scheme, group, symmetric):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "q"
    _quantize(tiny_llama, out, scheme, group, symmetric)
    folder = out / "compressed-tensors"
    qc = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["quantization_status"] == "compressed"
    fmt = {"w8a8": "int-quantized", "fp8": "float-quantized", "fp8_static": "float-quantized"}
    assert qc["format"] == fmt.get(scheme, "pack-quantized")
    assert qc["ignore"] == ["lm_head"]
    files = _files(folder)
    assert "model.layers.0.self_attn.q_proj." + ("weight_packed" if "a16" in scheme else "weight") in files
    if scheme.startswith("fp8"):
        assert files["model.layers.0.self_attn.q_proj.weight"].dtype == torch.float8_e4m3fn
        assert ("model.layers.0.self_attn.q_proj.input_scale" in files) == (scheme == "fp8_static")
    assert not any("qkv_proj" in k or "gate_up_proj" in k for k in files)  # fused groups split back

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    ids = torch.randint(3, 250, (2, 24), generator=torch.Generator().manual_seed(0))
    inputs, outputs = _layer_io(model, ids)  # (the client decompresses on the first forward)
    for name, w in _our_layers(out).items():  # its decompressed weights are ours, bit for bit
        assert torch.equal(model.get_submodule(name).weight.float(), w), name
    if scheme in ("w8a8", "fp8", "fp8_static"):
        # Quantized activations: end to end, float differences of 1e-7 upstream (fused vs separate GEMMs) can move
        # a value across a rounding boundary and change one activation code. Layer by layer, on the client's own
        # input, both must pick the same codes; the outputs then differ only by float32 summation order,
        # |Δ| ≤ 2·K·u·(|x̂|·|ŵ|ᵀ) with u = 2⁻²⁴ for each side's dot product of K terms.
        for layer in _export_layers(out):
            x = inputs[layer.name]
            ours = _our_linear(layer, x)
            x_hat, w_hat = _act_dequantized(layer, x), layer.dequantized()
            bound = 2 * layer.in_features * 2.0**-24 * (x_hat.abs() @ w_hat.abs().t())
            diff = (outputs[layer.name] - ours).reshape(bound.shape).abs()
            assert (diff <= bound).all(), (layer.name, float((diff - bound).max()))
    else:
        reference = load_quantized(out)(ids).logits
        torch.testing.assert_close(model(ids).logits, reference, rtol=1e-4, atol=1e-4)


def _layer_io(model: torch.nn.Module, ids: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Every Linear's input and output during one forward of the client's model."""
    inputs: dict[str, torch.Tensor] = {}
    outputs: dict[str, torch.Tensor] = {}
    hooks = []
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear):
            def hook(_m, args, out, name=name):
                inputs[name], outputs[name] = args[0].detach(), out.detach()
            hooks.append(mod.register_forward_hook(hook))
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    return inputs, outputs


def _export_layers(out: Path) -> list:
    desc = json.loads((out / "qcompiler.json").read_text())
    tensors = _files(out)
    return [layer for rec in desc["layers"].values() for layer in from_record(LayerRecord.from_dict(rec), tensors)]


def _our_linear(layer, x: torch.Tensor) -> torch.Tensor:
    """Our kernel oracle for one exported layer (per-layer tensors as the serving format splits them)."""
    from qcompiler.kernels import reference

    scale = layer.scale.reshape(-1) if not layer.per_tensor else layer.scale.reshape(-1)[:1].reshape(())
    if layer.type == "float":
        return reference.linear_fp8(x, layer.codes, scale, layer.input_scale, layer.bias)
    return reference.linear_w8a8(x, layer.codes.to(torch.int8), scale, layer.input_scale, layer.input_zero,
                                 layer.bias)


def _act_dequantized(layer, x: torch.Tensor) -> torch.Tensor:
    """The layer's quantize→dequantize of its input (what its integer or fp8 product multiplies)."""
    from qcompiler.kernels import reference

    x2 = x.reshape(-1, x.shape[-1])
    if layer.type == "float":
        x8, s = reference.quantize_act_fp8(x2, layer.input_scale)
        return x8.float() * s.float()
    if layer.input_scale is None:
        q, s = reference.quantize_act_dynamic(x2)
        return q.float() * s.float()
    zero = layer.input_zero if layer.input_zero is not None else torch.zeros(())
    return (reference.quantize_act_static(x2, layer.input_scale, zero).float() - zero) * layer.input_scale


@pytest.mark.parametrize(("scheme", "group"), [("w4a16", 32), ("w8a16", None)])
def test_compressed_tensors_asymmetric_decompresses_with_the_package(tiny_llama, tmp_path, scheme, group):
    """Asymmetric pack-quantized: zero points packed along N (the layout vLLM's wNa16 loader reads). transformers
    5.x cannot load these (it sizes weight_zero_point unpacked: llm-compressor#1618), so the package's own
    compressor decompresses each layer here."""
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationScheme

    out = tmp_path / "q"
    _quantize(tiny_llama, out, scheme, group, symmetric=False)
    folder = out / "compressed-tensors"
    group0 = json.loads((folder / "config.json").read_text())["quantization_config"]["config_groups"]["group_0"]
    assert group0["weights"]["symmetric"] is False
    ct_scheme = QuantizationScheme(targets=group0["targets"], weights=group0["weights"])
    files = _files(folder)
    for name, w in _our_layers(out).items():
        local = {k.removeprefix(name + "."): v for k, v in files.items() if k.startswith(name + ".")}
        n = w.shape[0]
        bits = 4 if scheme == "w4a16" else 8
        assert local["weight_zero_point"].shape[0] == -(-n * bits // 32)  # packed along the output dim
        got = PackedQuantizationCompressor.decompress(local, ct_scheme)["weight"]
        torch.testing.assert_close(got.float(), w, rtol=0, atol=1e-6)


@pytest.mark.parametrize("scheme", ["w8a8_dynamic", "w4a8"])
def test_compressed_tensors_dynamic_per_token_differs_only_by_the_client_activation_scale(tiny_llama, tmp_path,
                                                                                          scheme):
    """w8a8_dynamic (int-quantized) and w4a8 (pack-quantized int4 weights): weights reload bit for bit. compressed-tensors' CPU emulation scales per-token activations by
    absmax/127.5 where vLLM's kernel and ours use absmax/127, so logits agree to that rounding difference only."""
    from transformers import AutoModelForCausalLM

    out = tmp_path / "q"
    _quantize(tiny_llama, out, scheme, group=0)  # (w4a8: per-channel int4)
    folder = out / "compressed-tensors"
    qc = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert qc["format"] == ("pack-quantized" if scheme == "w4a8" else "int-quantized")
    acts = qc["config_groups"]["group_0"]["input_activations"]
    assert acts["dynamic"] is True and acts["strategy"] == "token"
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    ids = torch.randint(3, 250, (2, 24))
    reference, got = load_quantized(out)(ids).logits, model(ids).logits
    for name, w in _our_layers(out).items():
        assert torch.equal(model.get_submodule(name).weight.float(), w), name
    assert (got - reference).norm() / reference.norm() < 0.05


def test_compressed_tensors_reload_detects_wrong_scales(tiny_llama, tmp_path):
    """Negative control: the reload comparison above fails when a scale is wrong."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    out = tmp_path / "q"
    _quantize(tiny_llama, out, "w4a16")
    folder = out / "compressed-tensors"
    shard = sorted(folder.glob("model-*.safetensors"))[0]
    tensors = load_file(str(shard))
    tensors["model.layers.0.mlp.down_proj.weight_scale"] *= 1.5
    save_file(tensors, str(shard), metadata={"format": "pt"})
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    model(torch.randint(3, 250, (1, 8)))
    assert not torch.equal(model.model.layers[0].mlp.down_proj.weight, _our_layers(out)["model.layers.0.mlp.down_proj"])


def _awq_unpack(words: torch.Tensor) -> torch.Tensor:
    """AutoAWQ gemm, from the description: nibble i of word c holds column 8c + [0,2,4,6,1,3,5,7][i]."""
    order = [0, 2, 4, 6, 1, 3, 5, 7]
    w = words.to(torch.int64) & 0xFFFFFFFF
    rows, n_words = words.shape
    out = torch.empty(rows, n_words * 8, dtype=torch.int64)
    for i in range(8):
        out[:, order[i]::8] = (w >> (4 * i)) & 0xF
    return out


@pytest.mark.parametrize(("symmetric", "algo"), [(True, "rtn"), (False, "rtn"), (False, "awq")])
def test_awq_and_gptq_exports_unpack_to_our_weights(tiny_llama, tmp_path, symmetric, algo):
    """(--algo awq: awq_rtn quantizes before fusion, the fused q/k/v and gate/up are written from the stacked grids)"""
    out = tmp_path / "q"
    desc = _quantize(tiny_llama, out, "w4a16", 32, symmetric, algo, format="compressed-tensors,awq,gptq")
    assert desc["pipeline"].startswith("awq_rtn,fuse_linears" if algo == "awq" else "fuse_linears,rtn")
    ours = _our_layers(out)
    awq, gptq = _files(out / "awq"), _files(out / "gptq")
    awq_cfg = json.loads((out / "awq" / "config.json").read_text())["quantization_config"]
    gptq_cfg = json.loads((out / "gptq" / "config.json").read_text())["quantization_config"]
    assert awq_cfg == {**awq_cfg, "quant_method": "awq", "version": "gemm", "bits": 4, "group_size": 32,
                       "zero_point": True}
    assert gptq_cfg["quant_method"] == "gptq" and gptq_cfg["checkpoint_format"] == "gptq" and not gptq_cfg["desc_act"]
    for name, w in ours.items():
        n, k = w.shape
        # AWQ: qweight [K, N/8], qzeros [K/g, N/8], scales fp16 [K/g, N]
        qw, qz, s = awq[name + ".qweight"], awq[name + ".qzeros"], awq[name + ".scales"]
        assert qw.shape == (k, n // 8) and qz.shape == (k // 32, n // 8) and s.dtype == torch.float16
        u, z = _awq_unpack(qw), _awq_unpack(qz)
        w_awq = (u - z.repeat_interleave(32, 0)) * s.float().repeat_interleave(32, 0)
        # scales are stored fp16 (the format's dtype): compare against our codes with fp16-rounded scales
        assert torch.allclose(w_awq.t(), w, rtol=1e-3, atol=1e-6), name
        # GPTQ v1: qweight [K/8, N] packed along K, qzeros [K/g, N/8] storing z − 1, g_idx [K]
        gq, gz, gs, gi = (gptq[name + s_] for s_ in (".qweight", ".qzeros", ".scales", ".g_idx"))
        assert gq.shape == (k // 8, n) and gz.shape == (k // 32, n // 8) and gi.shape == (k,)
        ug = _unpack_int32(gq.t().contiguous(), 4, k)  # [N, K]
        zg = (_unpack_int32(gz, 4, n) + 1) & 0xF  # [K/g, N]
        w_gptq = (ug - zg[gi.long()].t()) * gs.float()[gi.long()].t()
        assert torch.equal(w_gptq, w_awq.t()), name
        if symmetric:
            assert bool((z == 8).all())


def test_format_that_cannot_hold_the_scheme_is_refused_before_any_work(tiny_llama, tmp_path):
    out = tmp_path / "q"
    with pytest.raises(SchemeError, match="format 'awq' cannot hold .*It holds: w4a16"):
        _quantize(tiny_llama, out, "w8a8", format="awq")
    with pytest.raises(SchemeError, match=r"group size 128 does not divide hidden_size .* = 96.*--group-size 32"):
        _quantize(tiny_llama, out, "w4a16", 128)  # compressed-tensors / vLLM load whole groups only
    with pytest.raises(SchemeError, match="unknown format"):
        _quantize(tiny_llama, out, "w4a16", format="marlin")
    assert not out.exists() and not list(tmp_path.glob(".q.tmp-*"))


def test_cli_quant_for_cuda(tiny_llama, tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text(TEXT * 4)
    out = tmp_path / "q"
    assert main(["quant", "--model", str(tiny_llama), "--scheme", "w4a16", "--group-size", "32", "--target", "cuda",
                 "--target-option", "format=compressed-tensors,gptq", "--out", str(out), "--calib-text", str(text),
                 "--num-samples", "4", "--seq-len", "32", "--no-progress"]) == 0
    assert (out / "compressed-tensors" / "model.safetensors.index.json").is_file()
    assert (out / "gptq" / "config.json").is_file() and not (out / "awq").exists()
    assert (out / "compressed-tensors" / "tokenizer.json").is_file()
    # a scheme the CUDA kernels cannot run is refused by the CLI with exit code 2 and the list of what runs
    capsys.readouterr()
    assert main(["quant", "--model", str(tiny_llama), "--scheme", "w8a8", "--asymmetric", "--target", "cuda",
                 "--out", str(tmp_path / "r")]) == 2
    assert "It runs:" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_readme_matrix_is_the_generated_one():
    """The README's scheme × target × consumer table is the registry's (regenerate: qcompile schemes --markdown)."""
    from qcompiler.targets.matrix import support_matrix

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    begin, end = "<!-- support-matrix:begin -->\n", "\n<!-- support-matrix:end -->"
    assert begin in readme and end in readme
    assert readme.split(begin, 1)[1].split(end, 1)[0] == support_matrix()
    cuda_w8a8 = next(line for line in support_matrix().splitlines() if line.startswith("| w8a8 |"))
    assert "awq" not in cuda_w8a8  # AWQ holds int4 weight-only layers only


def test_tied_head_is_listed_as_ignored_and_reloads(tmp_path):
    """A tied lm_head has no weight of its own in the files, yet it is a Linear the client must not quantize."""
    from tiny import make_tiny_model
    from transformers import AutoModelForCausalLM

    model = make_tiny_model(tmp_path / "tied", "llama", tie_word_embeddings=True)
    out = tmp_path / "q"
    _quantize(model, out, "w4a16", 32, format="compressed-tensors,awq")
    qc = json.loads((out / "compressed-tensors" / "config.json").read_text())["quantization_config"]
    assert qc["ignore"] == ["lm_head"]
    awq = json.loads((out / "awq" / "config.json").read_text())["quantization_config"]
    assert awq["modules_to_not_convert"] == ["lm_head"]
    ids = torch.randint(3, 250, (1, 16))
    got = AutoModelForCausalLM.from_pretrained(str(out / "compressed-tensors"), dtype=torch.float32)(ids).logits
    torch.testing.assert_close(got, load_quantized(out)(ids).logits, rtol=1e-4, atol=1e-4)


def test_cuda_runtime_lowering_gives_every_int4_layer_the_tinygemm_layout(tiny_llama, tmp_path):
    """load_quantized(lower_for="cuda")'s per-block step on a real artefact's graphs, on the meta device (no GPU
    here): every int4 linear of every block (q/k/v and gate/up fused) gets tinygemm's tiled layout and the block
    still maps hidden states to hidden states; without a CUDA device the lowering is refused before any work."""
    from qcompiler.errors import ArtifactError
    from qcompiler.runtime.cuda_prepack import prepack_for_cuda

    out = tmp_path / "q"
    _quantize(tiny_llama, out, "w4a16", group=32)
    model = load_quantized(out)  # (float32: the CPU's own prepack leaves qc::linear_woq in place)
    woq = torch.ops.qc.linear_woq.default
    for block in model.model.layers:
        before = sum(1 for n in block.gm.graph.nodes if n.target == woq)
        assert before == 4  # (q/k/v fused, o, gate/up fused, down)
        block.gm.to("meta")
        assert prepack_for_cuda(block.gm) == {"tinygemm": 4, "kept": 0}
        assert not any(n.target == woq for n in block.gm.graph.nodes)
    if not torch.cuda.is_available():
        with pytest.raises(ArtifactError, match="needs a CUDA device"):
            load_quantized(out, lower_for="cuda")


def test_group_check_reads_per_layer_sizes_of_heterogeneous_configs():
    """Gemma 4's config holds head_dim per layer (reading the global value raises) and adds per-layer input
    projections of hidden_size_per_layer_input columns: the up-front ragged-group check sees both."""
    from family_configs import BY_TYPE, family_config

    from qcompiler.errors import SchemeError
    from qcompiler.targets.base import linear_input_sizes, refuse_ragged_groups

    config = family_config(BY_TYPE["gemma4_text"])
    sizes = linear_input_sizes(config)
    head_dims = {layer.head_dim for layer in (config.per_layer_config[i] for i in range(config.num_hidden_layers))}
    assert len(head_dims) == 2 and {4 * d for d in head_dims} <= set(sizes.values())  # (4 heads; sliding, full)
    config.hidden_size_per_layer_input = 16
    with pytest.raises(SchemeError, match="per_layer_projection"):
        refuse_ragged_groups("cuda", "vLLM", config, get_scheme("w4a16", group_size=32))
