"""Tiny vision-language models of the published checkpoints' architectures, and image inputs built as their
processors build them (no image files, no processor backends): pixel tensors from a seeded generator and the
image placeholder tokens each model expects.

Each config keeps the published model's structural fields (rotary kind, projector, merge sizes, feature layer)
with sizes shrunk; `Vlm.copies` names the real config.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

IMAGE, START, END = 290, 291, 292  # placeholder ids inside the byte tokenizer's unused range (vocab 300)
TEXT = dict(vocab_size=300, hidden_size=96, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=24, max_position_embeddings=512, bos_token_id=1, eos_token_id=2,
            pad_token_id=2, tie_word_embeddings=False)


@dataclass(frozen=True)
class Vlm:
    model_type: str
    name: str
    copies: str
    config: dict[str, Any] = field(default_factory=dict)


def _qwen_vl_vision(kind: str) -> dict[str, Any]:
    if kind == "qwen2_vl":  # Qwen/Qwen2-VL-2B-Instruct: 32 blocks of 1280, merger 2×2 -> LM hidden
        return dict(depth=2, embed_dim=32, hidden_size=96, num_heads=2, mlp_ratio=2, patch_size=14,
                    spatial_merge_size=2, temporal_patch_size=2, in_chans=3)
    # Qwen/Qwen2.5-VL-3B-Instruct: windowed attention with full-attention blocks, SwiGLU MLP, RMSNorm
    return dict(depth=2, hidden_size=32, intermediate_size=48, num_heads=2, out_hidden_size=96, patch_size=14,
                spatial_merge_size=2, temporal_patch_size=2, in_channels=3, window_size=56,
                fullatt_block_indexes=[1])


# shared by the dense and MoE variants of a family (Qwen3-VL / Qwen3-VL-MoE; GLM-4.1V / GLM-4.5V)
QWEN3_VL_ROPE = {"rope_type": "default", "mrope_section": [4, 4, 4], "mrope_interleaved": True, "rope_theta": 5000000.0}
QWEN3_VL_VISION = dict(depth=2, hidden_size=32, intermediate_size=48, num_heads=2, out_hidden_size=96, patch_size=16,
                       spatial_merge_size=2, temporal_patch_size=2, in_channels=3, num_position_embeddings=64,
                       deepstack_visual_indexes=[0])
QWEN3_5_ROPE = {"rope_type": "default", "rope_theta": 10000000.0, "partial_rotary_factor": 0.25,
                "mrope_section": [1, 1, 1], "mrope_interleaved": True}
QWEN3_5_VISION = dict(depth=2, hidden_size=32, intermediate_size=48, num_heads=2, out_hidden_size=96, patch_size=16,
                      spatial_merge_size=2, temporal_patch_size=2, in_channels=3, num_position_embeddings=64)
GLM4V_ROPE = {"rope_type": "default", "mrope_section": [2, 2, 2], "rope_theta": 10000.0, "partial_rotary_factor": 0.5}
GLM4V_VISION = dict(depth=2, hidden_size=32, intermediate_size=48, num_heads=2, out_hidden_size=96, patch_size=14,
                    spatial_merge_size=2, temporal_patch_size=2, in_channels=3, image_size=56)


VLMS = (
    Vlm("qwen2_vl", "Qwen2-VL", "Qwen/Qwen2-VL-2B-Instruct (M-RoPE sections, 2×2 patch merger)", dict(
        text_config=dict(TEXT, model_type="qwen2_vl_text", rope_scaling={"type": "mrope", "mrope_section": [4, 4, 4]}),
        vision_config=_qwen_vl_vision("qwen2_vl"), image_token_id=IMAGE, vision_start_token_id=START,
        vision_end_token_id=END, video_token_id=293)),
    Vlm("qwen2_5_vl", "Qwen2.5-VL", "Qwen/Qwen2.5-VL-3B-Instruct (windowed ViT, M-RoPE)", dict(
        text_config=dict(TEXT, model_type="qwen2_5_vl_text",
                         rope_scaling={"type": "mrope", "mrope_section": [4, 4, 4]}),
        vision_config=_qwen_vl_vision("qwen2_5_vl"), image_token_id=IMAGE, vision_start_token_id=START,
        vision_end_token_id=END, video_token_id=293)),
    Vlm("qwen3_vl", "Qwen3-VL", "Qwen/Qwen3-VL-2B-Instruct (interleaved M-RoPE, DeepStack features, tied head)", dict(
        text_config=dict(TEXT, model_type="qwen3_vl_text", tie_word_embeddings=True, rope_scaling=QWEN3_VL_ROPE),
        vision_config=QWEN3_VL_VISION,
        image_token_id=IMAGE, vision_start_token_id=START, vision_end_token_id=END, video_token_id=293,
        tie_word_embeddings=True)),
    Vlm("llava", "LLaVA-1.5", "llava-hf/llava-1.5-7b-hf (CLIP ViT, 2-layer MLP projector, feature layer −2)", dict(
        text_config=dict(TEXT, model_type="llama"), image_token_index=IMAGE, projector_hidden_act="gelu",
        vision_feature_select_strategy="default", vision_feature_layer=-2,
        vision_config=dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2, image_size=28, patch_size=14, projection_dim=32))),
    Vlm("gemma3", "Gemma 3", "google/gemma-3-4b-it (SigLIP, pooled 2×2 image tokens, sliding + global layers)", dict(
        text_config=dict(TEXT, model_type="gemma3_text", sliding_window=16, query_pre_attn_scalar=24,
                         hidden_activation="gelu_pytorch_tanh", layer_types=["sliding_attention", "full_attention"]),
        vision_config=dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64,
                           num_hidden_layers=2, num_attention_heads=2, image_size=56, patch_size=14),
        mm_tokens_per_image=4, image_token_index=IMAGE, boi_token_index=START, eoi_token_index=END)),
    Vlm("internvl", "InternVL", "OpenGVLab/InternVL3-1B-hf (InternViT, pixel shuffle 0.5, Qwen2 language model)", dict(
        text_config=dict(TEXT, model_type="qwen2", use_sliding_window=False),
        vision_config=dict(model_type="internvl_vision", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2, image_size=[56, 56], patch_size=[14, 14]),
        image_token_id=IMAGE, image_seq_length=4, downsample_ratio=0.5, vision_feature_layer=-1)),
    Vlm("qwen3_vl_moe", "Qwen3-VL-MoE", "Qwen/Qwen3-VL-30B-A3B-Instruct (sparse MoE language model, DeepStack)", dict(
        text_config=dict(TEXT, model_type="qwen3_vl_moe_text", num_experts=4, num_experts_per_tok=2,
                         moe_intermediate_size=64, decoder_sparse_step=1, tie_word_embeddings=True, rope_scaling=QWEN3_VL_ROPE),
        vision_config=QWEN3_VL_VISION,
        image_token_id=IMAGE, vision_start_token_id=START, vision_end_token_id=END, video_token_id=293,
        tie_word_embeddings=True)),
    Vlm("qwen3_5", "Qwen3.5", "transformers' Qwen3.5 defaults (3 Gated DeltaNet : 1 gated full attention, here 1 : 1; "
        "a quarter of each head rotated, interleaved M-RoPE)", dict(
            text_config=dict(TEXT, model_type="qwen3_5_text", layer_types=["linear_attention", "full_attention"],
                             linear_num_key_heads=4, linear_num_value_heads=8, linear_key_head_dim=16,
                             linear_value_head_dim=16, rope_parameters=QWEN3_5_ROPE),
            vision_config=QWEN3_5_VISION, image_token_id=IMAGE, vision_start_token_id=START, vision_end_token_id=END,
            video_token_id=293)),
    Vlm("qwen3_5_moe", "Qwen3.5-MoE", "transformers' Qwen3.5-MoE defaults (Qwen3.5's hybrid layers, routed + gated "
        "shared experts)", dict(
            text_config=dict(TEXT, model_type="qwen3_5_moe_text", layer_types=["linear_attention", "full_attention"],
                             linear_num_key_heads=4, linear_num_value_heads=8, linear_key_head_dim=16,
                             linear_value_head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64,
                             shared_expert_intermediate_size=64, rope_parameters=QWEN3_5_ROPE),
            vision_config=QWEN3_5_VISION, image_token_id=IMAGE, vision_start_token_id=START, vision_end_token_id=END,
            video_token_id=293)),
    Vlm("glm4v", "GLM-4.1V", "zai-org/GLM-4.1V-9B-Thinking (M-RoPE on half the head, 2×2 merger, sandwich norms)", dict(
        text_config=dict(TEXT, model_type="glm4v_text", rope_parameters=GLM4V_ROPE),
        vision_config=GLM4V_VISION,
        image_token_id=IMAGE, image_start_token_id=START, image_end_token_id=END, video_token_id=293)),
    Vlm("glm4v_moe", "GLM-4.5V", "zai-org/GLM-4.5V (GLM-4.5-Air MoE language model, shared expert, q/k/v bias)", dict(
        text_config=dict(TEXT, model_type="glm4v_moe_text", n_routed_experts=4, n_shared_experts=1,
                         first_k_dense_replace=1, n_group=1, topk_group=1, norm_topk_prob=True,
                         routed_scaling_factor=1.0, num_experts_per_tok=2, moe_intermediate_size=64,
                         attention_bias=True, rope_parameters=GLM4V_ROPE),
        vision_config=GLM4V_VISION,
        image_token_id=IMAGE, image_start_token_id=START, image_end_token_id=END, video_token_id=293)),
    Vlm("llava_next", "LLaVA-NeXT", "llava-hf/llava-v1.6-mistral-7b-hf (any-resolution tiles, row newlines)", dict(
        text_config=dict(TEXT, model_type="mistral"), image_token_index=IMAGE, projector_hidden_act="gelu",
        vision_feature_select_strategy="default", vision_feature_layer=-2,
        image_grid_pinpoints=[[28, 56], [56, 28], [56, 56]],
        vision_config=dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2, image_size=28, patch_size=14, projection_dim=32))),
    Vlm("mistral3", "Mistral 3", "mistralai/Mistral-Small-3.1-24B-Instruct-2503 (Pixtral ViT, 2×2 patch merger)", dict(
        text_config=dict(TEXT, model_type="mistral"), image_token_index=IMAGE, spatial_merge_size=2,
        vision_feature_layer=-1, projector_hidden_act="gelu", multimodal_projector_bias=False,
        vision_config=dict(model_type="pixtral", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2, head_dim=16, image_size=56, patch_size=14))),
    Vlm("idefics3", "Idefics3", "HuggingFaceM4/Idefics3-8B-Llama3 (SigLIP, pixel shuffle ×2, Llama 3)", dict(
        text_config=dict(TEXT, model_type="llama"), image_token_id=IMAGE, scale_factor=2,
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=56, patch_size=14))),
    Vlm("smolvlm", "SmolVLM", "HuggingFaceTB/SmolVLM2-2.2B-Instruct (Idefics3 layout, SmolLM2 language model)", dict(
        text_config=dict(TEXT, model_type="llama", tie_word_embeddings=True), image_token_id=IMAGE, scale_factor=2,
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=56, patch_size=14), tie_word_embeddings=True)),
    Vlm("llama4", "Llama 4", "meta-llama/Llama-4-Scout-17B-16E-Instruct (MoE language model with chunked / no-rope "
        "layers, pixel-shuffle ViT 0.5)", dict(
            text_config=dict(TEXT, model_type="llama4_text", num_local_experts=4, num_experts_per_tok=1,
                             intermediate_size_mlp=160, attention_chunk_size=24, no_rope_layers=[1, 0],
                             interleave_moe_layer_step=1),
            vision_config=dict(hidden_size=32, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                               image_size=56, patch_size=14, pixel_shuffle_ratio=0.5, vision_output_dim=32,
                               projector_input_dim=32, projector_output_dim=32, vision_feature_layer=-1),
            image_token_index=IMAGE, boi_token_index=START, eoi_token_index=END)),
)


def image_inputs(vlm: Vlm, config: Any, seed: int = 0) -> dict[str, torch.Tensor]:
    """One prompt with one image, as the family's processor lays it out (2 sequences of the same layout)."""
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(3, 250, (2, 24), generator=g)
    if vlm.model_type in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "qwen3_5", "qwen3_5_moe", "glm4v",
                          "glm4v_moe"):
        v = config.vision_config
        grid = (1, 4, 6)  # t, h, w patches; 4·6 / merge² = 6 image tokens
        tokens = grid[1] * grid[2] // v.spatial_merge_size ** 2
        per_patch = 3 * v.temporal_patch_size * v.patch_size ** 2
        pixels = torch.randn(2 * grid[0] * grid[1] * grid[2], per_patch, generator=g)
        image = torch.tensor([[START] + [IMAGE] * tokens + [END]] * 2)
        ids = torch.cat([text[:, :4], image, text[:, 4:]], dim=1)
        return {"input_ids": ids, "pixel_values": pixels, "image_grid_thw": torch.tensor([grid, grid]),
                "mm_token_type_ids": (ids == IMAGE).long()}  # (1: image token, as the processor marks them)
    v = config.vision_config
    size = v.image_size if isinstance(v.image_size, int) else v.image_size[0]
    pixels = torch.randn(2, 3, size, size, generator=g)
    if vlm.model_type == "mistral3":  # one [IMG] per merged patch, then [IMG_END] (row breaks are plain text ids)
        tokens = (size // (v.patch_size * config.spatial_merge_size)) ** 2
        ids = torch.cat([text[:, :4], torch.tensor([[IMAGE] * tokens + [END]] * 2), text[:, 4:]], dim=1)
        return {"input_ids": ids, "pixel_values": pixels, "image_sizes": torch.tensor([[size, size]] * 2)}
    if vlm.model_type == "llava_next":  # a 2×2-tile image (56²): base tile + 4 tiles, each tile row ends in a newline
        tile, side = v.image_size, 2 * v.image_size
        per_side = side // v.patch_size
        tokens = (v.image_size // v.patch_size) ** 2 + per_side * per_side + per_side
        tiles = torch.randn(2, 5, 3, tile, tile, generator=g)
        ids = torch.cat([text[:, :4], torch.tensor([[IMAGE] * tokens] * 2), text[:, 4:]], dim=1)
        return {"input_ids": ids, "pixel_values": tiles, "image_sizes": torch.tensor([[side, side]] * 2)}
    if vlm.model_type in ("idefics3", "smolvlm"):  # one image of one tile: (patches / scale²) tokens
        tokens = (size // v.patch_size) ** 2 // config.scale_factor ** 2
        ids = torch.cat([text[:, :4], torch.tensor([[START] + [IMAGE] * tokens + [END]] * 2), text[:, 4:]], dim=1)
        return {"input_ids": ids, "pixel_values": pixels[:, None]}
    if vlm.model_type == "internvl":
        image = torch.tensor([[START] + [IMAGE] * config.image_seq_length + [END]] * 2)
    elif vlm.model_type == "llama4":  # (patches · pixel_shuffle_ratio²) tokens between image start and end
        tokens = int((size // v.patch_size) ** 2 * v.pixel_shuffle_ratio ** 2)
        image = torch.tensor([[START] + [IMAGE] * tokens + [END]] * 2)
    elif vlm.model_type == "llava":
        tokens = (v.image_size // v.patch_size) ** 2
        image = torch.tensor([[IMAGE] * tokens] * 2)
    else:  # gemma3
        image = torch.tensor([[START] + [IMAGE] * config.mm_tokens_per_image + [END]] * 2)
    ids = torch.cat([text[:, :4], image, text[:, 4:]], dim=1)
    out = {"input_ids": ids, "pixel_values": pixels}
    if vlm.model_type == "gemma3":
        out["token_type_ids"] = (ids == IMAGE).long()
    return out
