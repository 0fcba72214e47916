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
