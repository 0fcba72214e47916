"""Diffusion transformers (diffusers' SD3, FLUX and Wan 2.1 transformers) as per-block FX graphs.

A diffusers transformer folder (config.json with `_class_name`, safetensors weights) is built with diffusers' own
class; its blocks (`transformer_blocks`: joint / double-stream; `single_transformer_blocks`: FLUX's single-stream)
(Wan: `blocks`) are traced one by one with torch.export behind a flat adapter, dynamic in every dimension, so the same passes
(RTN, GPTQ, activation quantization, 2:4) rewrite their linears. Everything outside the blocks (patch / timestep /
text embeddings, rotary tables, adaLN of the output, final projection) stays float.

Calibration is timestep-aware: a DiT's activations move with the denoising step, so inputs are taken along a real
sampling trajectory — seeded Gaussian latents integrated by the pipeline's scheduler (FlowMatchEulerDiscreteScheduler,
as SD3 and FLUX pipelines use) with the model's own velocity predictions — and every block is calibrated on the
inputs the float model gives it at each of those steps (captured by forward pre-hooks). Text embeddings are seeded
Gaussians of the text encoders' widths (no text encoders are loaded: a transformer folder does not hold them).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import fx, nn
from torch.utils import _pytree as pytree

from qcompiler.errors import ModelLoadError, TraceError

# diffusers class → how its inputs are made (the families whose blocks and inputs are known here)
DIT_CLASSES = {"SD3Transformer2DModel": "sd3", "FluxTransformer2DModel": "flux", "WanTransformer3DModel": "wan",
               "HunyuanVideoTransformer3DModel": "hunyuan_video"}
BLOCK_LISTS = ("transformer_blocks", "single_transformer_blocks", "blocks")
# the flow-matching shift each family's pipeline samples with (Wan 2.1: 5 at 720p, 3 at 480p; HunyuanVideo: 7)
FLOW_SHIFT = {"sd3": 3.0, "flux": 1.0, "wan": 5.0, "hunyuan_video": 7.0}
# Blocks called with trailing positional arguments their forward takes as *args and never reads: HunyuanVideo's
# text-to-video blocks are called like its image-to-video ones, with token_replace_emb and the first frame's token
# count (a Python int a trace would fix to the calibration resolution). Only the leading ones are kept.
READ_POSITIONAL_ARGS = {"HunyuanVideoTransformerBlock": 5, "HunyuanVideoSingleTransformerBlock": 5}


def diffusers_class(model_dir: Path) -> str | None:
    """The diffusers class a folder's config.json names, or None for a folder that is not a diffusers model."""
    try:
        cfg = json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(cfg, dict) or "_diffusers_version" not in cfg:
        return None
    name = cfg.get("_class_name")
    if name not in DIT_CLASSES:
        raise ModelLoadError(f"'{model_dir}/config.json': diffusers class '{name}' is not supported; qcompiler "
                             f"quantizes {', '.join(DIT_CLASSES)}")
    if cfg.get("image_condition_type") == "token_replace":  # (HunyuanVideo-I2V: its blocks read the first frame's
        # token count, which a trace would fix to one resolution)
        raise ModelLoadError(f"'{model_dir}/config.json': HunyuanVideo's image-to-video variant (image_condition_type "
                             "'token_replace') is not supported; its text-to-video transformer is")
    return str(name)


def read_arguments(block: nn.Module | str, args: tuple[Any, ...]) -> tuple[Any, ...]:
    """The positional arguments a block reads (READ_POSITIONAL_ARGS)."""
    name = block if isinstance(block, str) else type(block).__name__
    keep = READ_POSITIONAL_ARGS.get(name)
    return args if keep is None else args[:keep]


def load_dit(model_dir: Path, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The transformer in `model_dir` built by its diffusers class from safetensors (no code from the folder)."""
    import diffusers

    name = diffusers_class(model_dir)
    if name is None:
        raise ModelLoadError(f"'{model_dir}': not a diffusers model folder (config.json has no _diffusers_version)")
    try:
        model = getattr(diffusers, name).from_pretrained(str(model_dir), torch_dtype=dtype, use_safetensors=True)
    except Exception as e:  # noqa: BLE001 (diffusers reports a damaged folder with many exception types)
        raise ModelLoadError(f"'{model_dir}': diffusers cannot build {name} from it "
                             f"({' '.join(str(e).split())[:300]})") from None
    return model.eval().requires_grad_(False)


def dit_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(checkpoint prefix, module) of every block, in the order the model runs them."""
    return [(f"{attr}.{i}", b) for attr in BLOCK_LISTS for i, b in enumerate(getattr(model, attr, None) or ())]


def _kind(model: nn.Module) -> str:
    return DIT_CLASSES[type(model).__name__]


def example_inputs(model: nn.Module, batch: int, generator: torch.Generator, latent_side: int = 8,
                   text_tokens: int = 12) -> dict[str, torch.Tensor]:
    """Seeded model inputs except `timestep`: Gaussian latents of latent_side² patches and text embeddings."""
    cfg = model.config
    width = cfg.get("joint_attention_dim") or cfg.get("text_dim") or cfg.get("text_embed_dim")
    text = torch.randn(batch, text_tokens, width, generator=generator)
    pooled = torch.randn(batch, cfg.get("pooled_projection_dim") or 1, generator=generator)
    if _kind(model) == "flux":  # packed latents [B, H·W, C] with their (0, row, column) ids
        side = torch.arange(latent_side * latent_side)
        img_ids = torch.stack([torch.zeros_like(side), side // latent_side, side % latent_side], -1).float()
        inputs = {"hidden_states": torch.randn(batch, latent_side * latent_side, cfg.in_channels, generator=generator),
                  "encoder_hidden_states": text, "pooled_projections": pooled, "img_ids": img_ids,
                  "txt_ids": torch.zeros(text_tokens, 3)}
        if cfg.guidance_embeds:
            inputs["guidance"] = torch.full((batch,), 3.5)
        return inputs
    if _kind(model) == "sd3":  # latents [B, C, H, W], patched inside
        side = latent_side * cfg.patch_size
        return {"hidden_states": torch.randn(batch, cfg.in_channels, side, side, generator=generator),
                "encoder_hidden_states": text, "pooled_projections": pooled}
    if _kind(model) == "hunyuan_video":  # video latents [B, C, F, H, W] of 2 latent frames, a text mask, pooled CLIP
        patch_t, patch = cfg.patch_size_t, cfg.patch_size
        side = max(2, round(latent_side / 2 ** 0.5))
        video = torch.randn(batch, cfg.in_channels, 2 * patch_t, side * patch, side * patch, generator=generator)
        mask = torch.ones(batch, text_tokens, dtype=torch.long)
        mask[1:, text_tokens - text_tokens // 4:] = 0  # (prompts of different lengths: the padding is masked)
        inputs = {"hidden_states": video, "encoder_hidden_states": text, "encoder_attention_mask": mask,
                  "pooled_projections": pooled}
        if cfg.guidance_embeds:  # (the pipeline's embedded guidance, scaled by 1000 as it passes it)
            inputs["guidance"] = torch.full((batch,), 6000.0)
        return inputs
    # Wan: video latents [B, C, F, H, W] of 2 latent frames, about latent_side² patches in all
    patch_t, patch = cfg.patch_size[0], cfg.patch_size[1]
    side = max(2, round(latent_side / 2 ** 0.5))
    video = torch.randn(batch, cfg.in_channels, 2 * patch_t, side * patch, side * patch, generator=generator)
    return {"hidden_states": video, "encoder_hidden_states": text}


def model_timestep(model: nn.Module, t: torch.Tensor, batch: int) -> torch.Tensor:
    """The scheduler's timestep t ∈ [0, 1000] as the model takes it (FLUX: t / 1000, scaled back inside)."""
    return (t / 1000.0 if _kind(model) == "flux" else t).expand(batch).float()


def sample(model: nn.Module, steps: int, batch: int, seed: int, latent_side: int = 8,
           inputs_from: nn.Module | None = None) -> tuple[list[dict[str, torch.Tensor]], torch.Tensor]:
    """A sampling run from seeded noise with the pipeline's scheduler (FlowMatchEulerDiscreteScheduler, SD3's
    shift 3) and `model`'s own velocity predictions, x_{i+1} = x_i + (σ_{i+1} − σ_i)·v(x_i, t_i): the model's inputs
    at every step and the final latents. Text embeddings are seeded Gaussians (`inputs_from` makes them: another
    model of the same config gives the same ones)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler: Any = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=FLOW_SHIFT[_kind(model)])
    scheduler.set_timesteps(steps)
    inputs = example_inputs(inputs_from or model, batch, torch.Generator().manual_seed(seed), latent_side)
    seen = []
    for t in scheduler.timesteps:
        step = {**inputs, "timestep": model_timestep(model, t, batch)}
        seen.append(step)
        with torch.no_grad():
            velocity = model(**step, return_dict=False)[0]
        inputs = {**inputs, "hidden_states": scheduler.step(velocity, t, inputs["hidden_states"]).prev_sample}
    return seen, inputs["hidden_states"]


@dataclass
class DitCall:
    """How the model calls a block: the pytree of (args, kwargs) with its tensor leaves taken out."""

    spec: Any
    constants: list[Any]  # the non-tensor leaves (None, ints), in leaf order
    tensor_positions: list[int]
    tuple_output: bool = True  # the block returns a tuple (FLUX, SD3: (text, image) streams) or one tensor

    @classmethod
    def of(cls, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[DitCall, tuple[torch.Tensor, ...]]:
        leaves, spec = pytree.tree_flatten((args, kwargs))
        tensors = [i for i, x in enumerate(leaves) if isinstance(x, torch.Tensor)]
        call = cls(spec, [x for x in leaves if not isinstance(x, torch.Tensor)], tensors)
        return call, tuple(leaves[i] for i in tensors)

    def unflatten(self, tensors: tuple[torch.Tensor, ...]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        leaves: list[Any] = []
        it_t, it_c = iter(tensors), iter(self.constants)
        positions = set(self.tensor_positions)
        for i in range(len(self.tensor_positions) + len(self.constants)):
            leaves.append(next(it_t) if i in positions else next(it_c))
        return pytree.tree_unflatten(leaves, self.spec)


class DitBlockAdapter(nn.Module):
    """A block called with its input tensors flat; returns its outputs as a flat tuple of tensors."""

    def __init__(self, block: nn.Module, call: DitCall):
        super().__init__()
        self.block = block  # (graph attributes are then "block.<path>", as for decoder blocks)
        self.call = call

    def forward(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        args, kwargs = self.call.unflatten(tensors)
        out = self.block(*args, **kwargs)
        return tuple(out) if isinstance(out, tuple | list) else (out,)


def capture_calls(model: nn.Module, steps: list[dict[str, torch.Tensor]]
                  ) -> dict[str, list[tuple[DitCall, tuple[torch.Tensor, ...]]]]:
    """Run the float model on each step's inputs and record what every block is called with."""
    calls: dict[str, list[tuple[DitCall, tuple[torch.Tensor, ...]]]] = {}
    hooks = []
    for name, block in dit_blocks(model):
        def record(m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], name: str = name) -> None:
            calls.setdefault(name, []).append(DitCall.of(read_arguments(m, args), kwargs))

        def returned(_m: nn.Module, _args: Any, _kwargs: Any, out: Any, name: str = name) -> None:
            calls[name][-1][0].tuple_output = isinstance(out, tuple | list)
        hooks.append(block.register_forward_pre_hook(record, with_kwargs=True))
        hooks.append(block.register_forward_hook(returned, with_kwargs=True))
    try:
        with torch.no_grad():
            for step in steps:
                model(**step, return_dict=False)
    finally:
        for h in hooks:
            h.remove()
    return calls


def trace_dit_block(block: nn.Module, call: DitCall, example: tuple[torch.Tensor, ...], name: str) -> fx.GraphModule:
    """The block as an FX graph of flat tensors, dynamic in every dimension but the features (batch, image and text
    tokens; rotary tables over both; every dimension of a mask)."""
    adapter = DitBlockAdapter(block, call).eval()
    # (the last dimension of a float input is its features; a mask's — HunyuanVideo's [B, 1, 1, tokens] — is tokens)
    dynamic = (tuple({d: torch.export.Dim.AUTO for d in range(t.dim() - (1 if t.is_floating_point() else 0))}
                     for t in example),)
    try:
        with torch.no_grad():
            return torch.export.export(adapter, example, dynamic_shapes=dynamic, strict=False).module()
    except Exception as e:  # torch raises many types here
        raise TraceError(name, type(e).__name__, str(e).strip().splitlines()[0][:300]) from e


class CompiledDitBlock(nn.Module):
    """A lowered block graph called the way the model calls the block it replaces."""

    def __init__(self, gm: fx.GraphModule, call: DitCall, block_class: str):
        super().__init__()
        self.gm = gm
        self._call = call
        self._block_class = block_class

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        call, tensors = DitCall.of(read_arguments(self._block_class, args), kwargs)
        if call.spec != self._call.spec or call.constants != self._call.constants:
            raise TypeError("the model calls this compiled block with other arguments than it was traced with")
        out = self.gm(*tensors)
        return tuple(out) if self._call.tuple_output else out[0]
