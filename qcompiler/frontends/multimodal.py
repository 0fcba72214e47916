"""Vision-language models: the language decoder's blocks are quantized, the vision tower and projector stay float.

A VLM folder (`model_type` of transformers' image-text-to-text table: Qwen2-VL, LLaVA, Gemma 3, ...) is built with
the class transformers loads it with (AutoModelForImageTextToText). Its decoder blocks are found inside the language
model (`get_decoder()`), never among the vision tower's; everything else (vision encoder, merger / projector,
embeddings, head) is outer weights, loaded float and written float.

Checkpoint names: transformers 5 keeps its VLM modules under `model.language_model` / `model.visual` and renames
older checkpoints on load (Qwen2-VL's `model.layers.*` and `visual.*`, LLaVA's `language_model.model.*`). The same
renames, taken from transformers' own table for the model (`get_model_conversion_mapping`), serve the checkpoint's
tensors under the module names here (Checkpoint views), so the blocks, the artefact and the exports use
transformers 5's names, which transformers and vLLM both load.
"""

from __future__ import annotations

from typing import Any

import torch


def is_multimodal(config: Any) -> bool:
    """A config that transformers builds as an image-text-to-text model (with a vision encoder)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    return (getattr(config, "model_type", None) in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES
            and getattr(config, "vision_config", None) is not None)


def auto_model_class(config: Any) -> Any:
    """transformers' auto class that builds this config's model with its head: image-text-to-text or causal LM."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    return AutoModelForImageTextToText if is_multimodal(config) else AutoModelForCausalLM


def model_logits(model: Any, **inputs: Any) -> torch.Tensor:
    """`model(**inputs).logits`. transformers 5.24.0's Llama 4 VLM computes its logits, then fails building its
    output object (it reads `image_outputs` off its language model's output, which has none): for it, the steps its
    forward takes up to that line (image features, projector, placeholders filled, language model)."""
    if type(model).__name__ != "Llama4ForConditionalGeneration":
        return model(**inputs).logits
    ids, pixels = inputs.pop("input_ids", None), inputs.pop("pixel_values", None)
    embeds = inputs.pop("inputs_embeds", None)
    if embeds is None:
        embeds = model.get_input_embeddings()(ids)
    if pixels is not None:
        features = model.get_image_features(pixel_values=pixels, return_dict=True).last_hidden_state
        projected = model.multi_modal_projector(features.view(-1, features.size(-1))).to(embeds.dtype)
        mask = model.get_placeholder_mask(ids, inputs_embeds=embeds, image_features=projected)
        embeds = embeds.masked_scatter(mask, projected)
    return model.language_model(inputs_embeds=embeds, **inputs).logits


def language_model_path(model: torch.nn.Module) -> str:
    """The module path of a VLM's language decoder ("" for a causal LM: the whole model is searched)."""
    if not is_multimodal(model.config) or not hasattr(model, "get_decoder"):
        return ""
    decoder = model.get_decoder()
    for path, mod in model.named_modules():
        if mod is decoder:
            return path
    return ""


def view_under_module_names(model: torch.nn.Module, ckpt: Any) -> int:
    """Serve every checkpoint tensor that transformers renames when loading this model under the module name it
    gets (Checkpoint.add_views); returns how many were renamed."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightRenaming, rename_source_key

    rules = [r for r in get_model_conversion_mapping(model) if isinstance(r, WeightRenaming)]
    state = model.state_dict()
    views: dict[str, tuple[tuple[str, ...], Any]] = {}
    for stored in list(ckpt.weight_map):
        if stored in state:
            continue
        name, _ = rename_source_key(stored, rules, [], base_model_prefix=model.base_model_prefix,
                                    meta_state_dict=state)
        if name != stored and name in state and name not in ckpt.weight_map:
            views[name] = ((stored,), _same)
    if views:
        ckpt.add_views(views, replace=[sources[0] for sources, _ in views.values()])
    return len(views)


def _same(t: torch.Tensor) -> torch.Tensor:
    return t
