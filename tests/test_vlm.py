"""Vision-language models (issue 16): the language model's blocks are quantized, the vision tower and projector are
written float, bit for bit, under the names transformers 5 gives them, and every export says so to its client
(compressed-tensors' `ignore`, msModelSlim's FLOAT). The numerics of each family × scheme × target, with an image in
the prompt, are cells of the support matrix (tests/test_support_matrix.py, rows "VLM: ...")."""

from __future__ import annotations

import json

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
