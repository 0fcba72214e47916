"""Vision-language models (issue 16): the language model's blocks are quantized, the vision tower and projector are
written float, bit for bit, under the names transformers 5 gives them, and every export says so to its client
(compressed-tensors' `ignore`, msModelSlim's FLOAT). The numerics of each family × scheme × target, with an image in
the prompt, are cells of the support matrix (tests/test_support_matrix.py, rows "VLM: ...")."""

from __future__ import annotations

import json

import pytest
import torch
from family_configs import BY_TYPE, make_family_model
from safetensors.torch import load_file
from tiny import TEXT

from qcompiler.driver import QuantizeConfig, quantize
from qcompiler.schemes import get_scheme


def _tensors(folder) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def test_qwen2_vl_vision_tower_stays_float_and_every_export_says_so(tmp_path):
    src = make_family_model(tmp_path / "qwen2_vl", BY_TYPE["qwen2_vl"])
    processor = {"preprocessor_config.json": {"image_processor_type": "Qwen2VLImageProcessor", "patch_size": 14},
                 "chat_template.json": {"chat_template": "{{ messages }}"}}
    for name, body in processor.items():
        (src / name).write_text(json.dumps(body))
    stored = _tensors(src)
    assert any(k.startswith("visual.") for k in stored) and any(k.startswith("model.layers.") for k in stored)
    out = tmp_path / "q"
    desc = quantize(QuantizeConfig(model=src, scheme=get_scheme("w8a8_dynamic"), out=out, target="cuda",
                                   calib_texts=[TEXT], num_samples=2, seq_len=32, batch_size=2, progress=False),
                    log=lambda _: None)
    # only the language model's linears are quantized (under transformers 5's names)
    assert desc["layers"] and all(p.startswith("model.language_model.layers.") for p in desc["layers"])
    # the checkpoint's vision tensors (`visual.*`, as Qwen2-VL stores them) are written under the module names
    # (`model.visual.*`), unchanged
    artefact = _tensors(out)
    vision = {k: v for k, v in stored.items() if k.startswith("visual.")}
    for k, v in vision.items():
        assert torch.equal(artefact[f"model.{k}"], v), k
    for folder in (out, out / "compressed-tensors"):
        for name in processor:
            assert json.loads((folder / name).read_text()) == processor[name], (folder, name)
    client = out / "compressed-tensors"
    written = _tensors(client)
    for k, v in vision.items():
        assert torch.equal(written[f"model.{k}"].float(), v), k
    ignore = set(json.loads((client / "config.json").read_text())["quantization_config"]["ignore"])
    vision_linears = {k.rsplit(".", 1)[0] for k, v in vision.items() if k.endswith(".weight") and v.dim() == 2}
    assert vision_linears and {f"model.{m}" for m in vision_linears} <= ignore
    assert not any(m.startswith("model.language_model.layers.") for m in ignore)


def test_qwen2_vl_ascend_description_names_the_vision_layers_float(tmp_path):
    src = make_family_model(tmp_path / "qwen2_vl", BY_TYPE["qwen2_vl"])
    out = tmp_path / "q"
    quantize(QuantizeConfig(model=src, scheme=get_scheme("w8a8_dynamic"), out=out, target="ascend",
                            calib_texts=[TEXT], num_samples=2, seq_len=32, batch_size=2, progress=False),
             log=lambda _: None)
    folder = out / "msmodelslim"
    description = json.loads(next(folder.glob("quant_model_description*.json")).read_text())
    vision = {k: v for k, v in description.items() if k.startswith("model.visual.")}
    language = {k: v for k, v in description.items() if k.startswith("model.language_model.layers.")
                and k.endswith("proj.weight")}
    assert vision and set(vision.values()) == {"FLOAT"}
    assert language and set(language.values()) == {"W8A8_DYNAMIC"}


def _llava_with_processor(path, projector_gain: float = 1.0):
    """The matrix's tiny LLaVA, saved with a processor (qcompiler.synthetic.write_random_llava)."""
    from qcompiler.synthetic import write_random_llava

    fields = BY_TYPE["llava"].fields
    return write_random_llava(path, text=fields["text_config"],
                              vision={k: v for k, v in fields["vision_config"].items() if k != "model_type"},
                              outlier_gain=projector_gain)


def _images(folder, seeds) -> list:
    from qcompiler.synthetic import write_random_images

    return [p for s in seeds for p in write_random_images(folder, 1, seed=s)]


def test_calib_images_calibrate_the_image_positions_through_the_models_processor(tmp_path):
    """Static W8A8 on a LLaVA whose image tokens carry a 40× outlier channel (the projector's first output): calibrated
    on text only, the activation grids clip every image position; calibrated with --calib-images on image + prompt samples (the
    model's own processor places and expands the image token), image prompts come out several times closer to the
    float model. Both artefacts are the same code path but for the calibration batches."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from qcompiler.calib.images import prompt_with_image
    from qcompiler.runtime import load_quantized

    src = _llava_with_processor(tmp_path / "llava", projector_gain=40.0)
    calib = tmp_path / "calib"
    names = [p.name for p in _images(calib, seeds=[1, 2, 3, 4])]
    (calib / "prompts.jsonl").write_text("".join(json.dumps({"image": n, "prompt": f"What is in picture {i}?"}) + "\n"
                                                 for i, n in enumerate(names)))
    (held_out,) = _images(tmp_path / "eval", seeds=[99])
    processor = AutoProcessor.from_pretrained(str(src))
    from PIL import Image

    inputs = dict(processor(images=[Image.open(held_out).convert("RGB")],
                            text=[prompt_with_image(processor, "Describe this image in detail.")], return_tensors="pt"))
    inputs.pop("attention_mask")
    assert (inputs["input_ids"] == processor.tokenizer.convert_tokens_to_ids("<image>")).sum() == 4  # (2×2 patches)
    with torch.no_grad():
        float_logits = LlavaForConditionalGeneration.from_pretrained(str(src), dtype=torch.float32)(**inputs).logits

    def error(**calibration) -> float:
        out = tmp_path / f"q-{len(calibration)}-{sorted(calibration)[0]}"
        quantize(QuantizeConfig(model=src, scheme=get_scheme("w8a8"), out=out, num_samples=4, seq_len=32,
                                batch_size=2, progress=False, **calibration), log=lambda _: None)
        with torch.no_grad():
            ours = load_quantized(out)(**inputs).logits
        return float((ours - float_logits).norm() / float_logits.norm())

    text_calibrated = error(calib_texts=[TEXT])
    image_calibrated = error(calib_images=calib)
    assert image_calibrated < 0.5 * text_calibrated, (image_calibrated, text_calibrated)


def test_calib_images_refuses_a_text_model_and_a_bad_listing_by_name(tiny_llama, tmp_path, capsys):
    from qcompiler.calib.images import read_image_prompts
    from qcompiler.cli import main
    from qcompiler.errors import QCompilerError

    calib = tmp_path / "calib"
    _images(calib, seeds=[1])
    out = tmp_path / "q"
    capsys.readouterr()
    rc = main(["quant", "--model", str(tiny_llama), "--scheme", "w8a16", "--out", str(out), "--calib-images",
               str(calib), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert "--calib-images calibrates vision-language models" in err[0] and "--calib-text" in err[0]
    assert not out.exists()
    (calib / "prompts.jsonl").write_text(json.dumps({"image": "../secret.png", "prompt": "x"}) + "\n")
    for listing, expected in [({"image": "../secret.png"}, "points outside the folder"),
                              ({"image": "missing.png"}, "is not a file inside"),
                              ({"picture": "image-1-0.png"}, 'expected {"image"')]:
        (calib / "prompts.jsonl").write_text(json.dumps(listing) + "\n")
        try:
            read_image_prompts(calib)
        except QCompilerError as e:
            assert expected in str(e) and "prompts.jsonl:1" in str(e), str(e)
        else:
            raise AssertionError(listing)
    (calib / "prompts.jsonl").unlink()
    assert [p.name for p, _ in read_image_prompts(calib)] == ["image-1-0.png"]


def test_the_residual_rotation_is_refused_for_a_vlm_whose_image_features_it_would_not_rotate(tmp_path, capsys):
    """w4a4's default pipeline rotates the residual stream (embeddings E·R, every block's weights); a VLM's projector
    writes image features into that stream unrotated, so its blocks would compute garbage on image tokens: the run is
    refused by name, before anything is written."""
    from qcompiler.cli import main

    src = make_family_model(tmp_path / "llava", BY_TYPE["llava"])
    out = tmp_path / "q"
    capsys.readouterr()  # (the fixture's own output)
    assert main(["quant", "--model", str(src), "--scheme", "w4a4", "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "vision-language model" in err and "'llava'" in err and err.count("\n") == 1
    assert not out.exists()


# ------------------------------------------------------------------ --vision-scheme: the vision tower quantized too


def _vision_block_linears(model_dir) -> tuple[set[str], set[str]]:
    """(the linears of the vision encoder's blocks, the other linears of the tower and projector), found independently
    of qcompiler: transformers' model, every nn.Linear under its vision tower's module whose path goes through a
    numbered layer."""
    import re

    from transformers import AutoConfig

    from qcompiler.frontends.multimodal import auto_model_class

    model = auto_model_class(AutoConfig.from_pretrained(str(model_dir))).from_pretrained(str(model_dir))
    tower = next(n for n in ("model.visual", "model.vision_tower") if any(k.startswith(n + ".")
                                                                          for k, _ in model.named_modules()))
    # (the encoder's numbered blocks; Qwen3-VL's DeepStack mergers, also numbered, are not blocks)
    blocks = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n.startswith(tower + ".")
              and re.search(r"\.(blocks|layers)\.\d+\.", n)}
    others = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n not in blocks
              and (n.startswith(tower + ".") or "projector" in n)}
    return blocks, others


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize(("family", "vision"), [("qwen2_vl", "w8a8_dynamic"), ("llava", "w8a16"),
                                                ("qwen3_vl", "w8a8_dynamic"), ("gemma3", "w8a8_dynamic")])
def test_vision_scheme_quantizes_the_vision_tower_for_every_consumer(tmp_path, family, vision):
    """--vision-scheme: every linear of the vision encoder's blocks is quantized (the merger / projector are not);
    our artefact equals transformers' model with those layers' ŵ and activation grids (tests/twin.py), the msModelSlim
    folder (its description naming them W8A8_DYNAMIC / W8A16) runs to our logits, and transformers loads the
    compressed-tensors folder (the layers out of `ignore`) with our weights, bit for bit.
    Tolerance: the same float32 network (|Δ|/|y| ≤ 1e-5); with dynamic activations an input code may round the
    other way between two float32 computations, so the error must stay under half of what the grids move."""
    from family_configs import family_inputs
    from transformers import AutoConfig
    from twin import artefact_layers, transformers_twin

    from qcompiler.frontends.multimodal import auto_model_class
    from qcompiler.runtime import load_quantized
    from qcompiler.runtime.msmodelslim import load_msmodelslim

    src = make_family_model(tmp_path / family, BY_TYPE[family])
    inputs = family_inputs(BY_TYPE[family], src)
    expected, outside = _vision_block_linears(src)
    runs = {}
    for target, vision_scheme in (("cuda", vision), ("ascend", vision), ("reference", None)):
        out = tmp_path / f"q-{target}"
        desc = quantize(QuantizeConfig(model=src, scheme=get_scheme("w8a16"), out=out, target=target,
                                       vision_scheme=vision_scheme, calib_texts=[TEXT], num_samples=2, seq_len=32,
                                       batch_size=2, progress=False), log=lambda _: None)
        runs[target] = (out, desc)
    out, desc = runs["cuda"]
    assert set(desc["vision"]["layers"]) == expected and desc["vision"]["scheme"] == vision
    assert "vision" not in runs["reference"][1]
    with torch.no_grad():
        ours = load_quantized(out)(**inputs).logits
        without_vision = load_quantized(runs["reference"][0])(**inputs).logits
        twin = transformers_twin(src, out)(**inputs).logits
        act_free = transformers_twin(src, out, activations=False)(**inputs).logits
    assert _rel(ours, without_vision) > 1e-4  # (the quantized tower is what runs)
    tolerance = 1e-5 if vision == "w8a16" else 0.5 * _rel(act_free, twin)
    assert _rel(ours, twin) <= tolerance, (_rel(ours, twin), tolerance)

    folder = runs["ascend"][0] / "msmodelslim"
    described = json.loads((folder / "quant_model_description.json").read_text())
    kind = {"w8a16": "W8A16", "w8a8_dynamic": "W8A8_DYNAMIC"}[vision]
    assert {described[f"{n}.weight"] for n in expected} == {kind}
    assert {described[f"{n}.weight"] for n in outside} <= {"FLOAT"}
    with torch.no_grad():
        assert _rel(load_msmodelslim(folder)(**inputs).logits, ours) <= 1e-5

    client_dir = out / "compressed-tensors"
    ignore = set(json.loads((client_dir / "config.json").read_text())["quantization_config"]["ignore"])
    assert not expected & ignore and outside <= ignore  # (mergers, projectors and pooling heads stay float)
    client = auto_model_class(AutoConfig.from_pretrained(str(src))).from_pretrained(str(client_dir),
                                                                                   dtype=torch.float32)
    layers, _ = artefact_layers(out)
    vision_layers = [la for la in layers if la.name in expected]
    assert len(vision_layers) == len(expected)
    if vision == "w8a16":  # (transformers keeps pack-quantized layers compressed: their logits are the check)
        with torch.no_grad():
            assert _rel(client(**inputs).logits, ours) <= 1e-5
    else:  # (int-quantized: int8 codes and scales as loaded; its CPU emulation rounds dynamic activations otherwise)
        for la in vision_layers:
            mod = client.get_submodule(la.name)
            w = mod.weight.float() * mod.weight_scale.float() if mod.weight.dtype == torch.int8 else mod.weight.float()
            assert torch.equal(w, la.dequantized()), la.name


def test_vision_scheme_static_calibrates_on_images_and_refuses_without_them(tmp_path, capsys):
    """Static w8a8 vision activations take one scale per layer input from the calibration images (max |x| / 127 over
    every image, through the model's processor); without --calib-images the run is refused before anything is
    written, as it is for a text model."""
    from qcompiler.cli import main
    from qcompiler.errors import PipelineError
    from qcompiler.runtime import load_quantized

    src = _llava_with_processor(tmp_path / "llava")
    calib = tmp_path / "calib"
    _images(calib, seeds=[1, 2])
    out = tmp_path / "q"
    capsys.readouterr()
    rc = main(["quant", "--model", str(src), "--scheme", "w8a16", "--vision-scheme", "w8a8", "--out", str(out),
               "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "--calib-images" in err[0] and "w8a8_dynamic" in err[0], err
    assert not out.exists()
    with pytest.raises(PipelineError, match="has none"):
        quantize(QuantizeConfig(model=make_family_model(tmp_path / "llama", BY_TYPE["llama"]),
                                scheme=get_scheme("w8a16"), out=tmp_path / "t", vision_scheme="w8a16",
                                calib_texts=[TEXT], num_samples=2, seq_len=32, progress=False), log=lambda _: None)
    assert not (tmp_path / "t").exists()

    captured: dict[str, float] = {}

    def record_ranges(model, run):  # the observer's ranges, seen independently: hooks on the float tower
        from qcompiler.frontends.vision import vision_linears

        hooks = [model.get_submodule(n).register_forward_pre_hook(
            lambda _m, a, n=n: captured.__setitem__(n, max(captured.get(n, 0.0), float(a[0].abs().max()))))
            for n in vision_linears(model)]
        run()
        for h in hooks:
            h.remove()

    import qcompiler.frontends.vision as vision_module

    observe = vision_module.observe_input_ranges

    def observing(model, names, run):
        record_ranges(model, run)
        return observe(model, names, run)

    vision_module.observe_input_ranges = observing
    try:
        desc = quantize(QuantizeConfig(model=src, scheme=get_scheme("w8a16"), out=out, vision_scheme="w8a8",
                                       calib_images=calib, num_samples=2, seq_len=32, batch_size=1, progress=False),
                        log=lambda _: None)
    finally:
        vision_module.observe_input_ranges = observe
    records = desc["vision"]["layers"]
    assert records and set(records) == set(captured)
    from safetensors.torch import load_file

    stored = {}
    for f in out.glob("*.safetensors"):
        stored.update(load_file(str(f)))
    for name, rec in records.items():
        assert rec["op"] == "linear_w8a8" and rec["activations"]["dynamic"] is False
        assert float(stored[rec["tensors"]["input_scale"]]) == pytest.approx(captured[name] / 127, rel=1e-6)
    from PIL import Image
    from transformers import AutoProcessor
    from twin import transformers_twin

    from qcompiler.calib.images import prompt_with_image

    (held_out,) = _images(tmp_path / "eval", seeds=[99])
    processor = AutoProcessor.from_pretrained(str(src))
    inputs = dict(processor(images=[Image.open(held_out).convert("RGB")],
                            text=[prompt_with_image(processor, "Describe this image.")], return_tensors="pt"))
    inputs.pop("attention_mask")
    with torch.no_grad():
        ours = load_quantized(out)(**inputs).logits
        twin = transformers_twin(src, out)(**inputs).logits
        act_free = transformers_twin(src, out, activations=False)(**inputs).logits
    assert _rel(ours, twin) <= 0.5 * _rel(act_free, twin)


def test_llama4_vlm_logits_are_transformers_own_and_its_artefact_evaluates(tmp_path, monkeypatch):
    """transformers 5.24.0's Llama 4 VLM computes its logits, then fails reading `image_outputs` off its language
    model's output; model_logits takes the logits by the same steps. With the missing attribute supplied (here only),
    transformers' own forward runs to the end and must agree exactly; the quantized artefact then evaluates."""
    from family_configs import family_inputs
    from transformers import AutoModelForImageTextToText
    from transformers.modeling_outputs import MoeCausalLMOutputWithPast

    from qcompiler.eval.report import evaluate
    from qcompiler.frontends.multimodal import model_logits

    src = make_family_model(tmp_path / "llama4", BY_TYPE["llama4"])
    model = AutoModelForImageTextToText.from_pretrained(str(src), dtype=torch.float32).eval()
    inputs = family_inputs(BY_TYPE["llama4"], src)
    with torch.no_grad():
        ours = model_logits(model, **inputs)
        text_only = model_logits(model, input_ids=inputs["input_ids"])
        with pytest.raises(AttributeError, match="image_outputs"):  # (when transformers fixes it, drop the glue)
            model(**inputs)
        monkeypatch.setattr(MoeCausalLMOutputWithPast, "image_outputs", None, raising=False)
        theirs = model(**inputs).logits
    assert torch.equal(ours, theirs)
    assert (ours - text_only).abs().max() > 1e-3  # (the image reached the logits)
    out = tmp_path / "q"
    quantize(QuantizeConfig(model=src, scheme=get_scheme("w8a16"), out=out, calib_texts=[TEXT], num_samples=2,
                            seq_len=32, batch_size=2, progress=False), log=lambda _: None)
    monkeypatch.undo()
    text = tmp_path / "eval.txt"
    text.write_text(TEXT * 4)
    report = evaluate(out, text=text, seq_len=32, max_tokens=1024, progress=False)
    assert report["quantized"]["tokens"] == report["float"]["tokens"] > 0
    # (int8 per-channel weights of σ-0.05 random matrices: a weight SQNR near 40 dB, far under 1 % perplexity)
    assert 0 < abs(report["ppl_increase_pct"]) < 1, report
