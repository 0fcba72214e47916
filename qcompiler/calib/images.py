"""Image + text calibration for vision-language models (`qcompile quant --calib-images DIR`).

A VLM's language blocks see image tokens (the vision tower's features, spliced in where the prompt holds the
image placeholder) as well as text tokens, and their activation ranges differ: calibrating on text alone
measures none of the image positions. Here each calibration sample is one image and one prompt, turned into the
model's inputs by the model's own processor (its image processor resizes and patches the image, its chat
template or image token places the placeholder, the tokenizer expands it to the number of image tokens the
model expects). The driver runs the whole model's prologue on those inputs, so the first block receives the
merged text + image hidden states (and M-RoPE positions, DeepStack features, ... whatever the model computes).

Folder layout: `DIR/prompts.jsonl` with one `{"image": "<file in DIR>", "prompt": "<text>"}` per line, or, without
it, every image file of DIR (sorted by name) with one default prompt. Each sample is one batch, taken whole (an
image's tokens are never cut; `--seq-len` does not apply), so samples of different sizes need no padding.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from qcompiler.errors import CalibrationError
from qcompiler.files import relative_file_name

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
DEFAULT_PROMPT = "Describe this image in detail."
PROMPTS_FILE = "prompts.jsonl"

Batch = dict[str, torch.Tensor]


def read_image_prompts(folder: Path) -> list[tuple[Path, str]]:
    """(image file, prompt) pairs of a --calib-images folder, every name checked to be a file inside it."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CalibrationError(f"--calib-images '{folder}' is not a folder; give a folder of images "
                               f"(and optionally {PROMPTS_FILE})")
    listing = folder / PROMPTS_FILE
    if not listing.is_file():
        images = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not images:
            raise CalibrationError(f"--calib-images '{folder}' holds no image files ({', '.join(IMAGE_SUFFIXES)}) "
                                   f"and no {PROMPTS_FILE}")
        return [(p, DEFAULT_PROMPT) for p in images]
    try:
        lines = listing.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise CalibrationError(f"'{listing}' cannot be read as UTF-8 text ({e})") from None
    pairs = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{listing}:{i}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise CalibrationError(f"{where}: not valid JSON ({e.msg})") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("image"), str) or not isinstance(
                obj.get("prompt", DEFAULT_PROMPT), str):
            raise CalibrationError(f'{where}: expected {{"image": "<file name>", "prompt": "<text>"}}')
        name = relative_file_name(obj["image"], where, CalibrationError)
        path = folder / name
        if path.is_symlink() or not path.is_file() or folder.resolve() not in path.resolve().parents:
            raise CalibrationError(f"{where}: image '{name}' is not a file inside '{folder}'")
        pairs.append((path, obj.get("prompt", DEFAULT_PROMPT)))
    if not pairs:
        raise CalibrationError(f"'{listing}' lists no images")
    return pairs


def load_processor(model_dir: Path, trust_remote_code: bool = False) -> Any:
    """The model folder's own processor (image processor + tokenizer + chat template)."""
    from transformers import AutoProcessor

    try:
        processor = AutoProcessor.from_pretrained(str(model_dir), trust_remote_code=trust_remote_code)
    except Exception as e:  # noqa: BLE001 (transformers raises many kinds for a missing or foreign processor)
        raise CalibrationError(f"'{model_dir}' has no processor transformers can load "
                               f"({' '.join(str(e).split())[:160]}); --calib-images needs the processor files the "
                               "model was published with (processor_config.json / preprocessor_config.json)") from None
    if getattr(processor, "image_processor", None) is None:
        raise CalibrationError(f"'{model_dir}': its processor ({type(processor).__name__}) has no image processor; "
                               "--calib-images needs a vision-language model's processor")
    return processor


def prompt_with_image(processor: Any, prompt: str) -> str:
    """The text the processor expects for one image and `prompt`: the chat template's user turn where the folder
    has one, else the processor's image token before the prompt."""
    if getattr(processor, "chat_template", None):
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return str(text)
    token = getattr(processor, "image_token", None)
    if not token:
        raise CalibrationError(f"{type(processor).__name__} has neither a chat template nor an image token, so the "
                               "image placeholder cannot be placed; add the model's chat template to its folder")
    return f"{token}\n{prompt}"


def image_calibration_batches(processor: Any, pairs: list[tuple[Path, str]], num_samples: int) -> list[Batch]:
    """The model's keyword inputs for the first `num_samples` (image, prompt) pairs, one pair per batch."""
    from PIL import Image

    batches = []
    for path, prompt in pairs[:num_samples]:
        try:
            with Image.open(path) as im:
                image = im.convert("RGB")
        except Exception as e:  # noqa: BLE001 (PIL raises several kinds for unreadable images)
            raise CalibrationError(f"image '{path}' cannot be read ({' '.join(str(e).split())[:120]}); "
                                   "remove it or list only readable images") from None
        try:
            inputs = processor(images=[image], text=[prompt_with_image(processor, prompt)], return_tensors="pt")
        except CalibrationError:
            raise
        except Exception as e:  # noqa: BLE001
            raise CalibrationError(f"the model's processor cannot prepare image '{path}' "
                                   f"({' '.join(str(e).split())[:160]})") from None
        # (every sample is one unpadded sequence: the mask is all ones, and the model builds the causal one itself)
        batches.append({k: v for k, v in inputs.items() if isinstance(v, torch.Tensor) and k != "attention_mask"})
    return batches
