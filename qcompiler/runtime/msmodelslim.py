"""Load an msModelSlim ascend v1 folder (ours, or msModelSlim's own output) as a runnable model whose quantized
linears run as the torch_npu calls Ascend serving makes (kernels/ascend/layout.py): what vllm-ascend and MindIE
do with the folder, on the emulated ops off an NPU. Used to check our exports and to compare with msModelSlim.
A causal LM / VLM folder is built by transformers' class, a diffusion transformer's by its diffusers class.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import torch
from safetensors.torch import load_file

from qcompiler.errors import ArtifactError
from qcompiler.export.msmodelslim import DESCRIPTION, FA_MODULES
from qcompiler.frontends.diffusers import diffusers_class
from qcompiler.frontends.hf import find_blocks
from qcompiler.frontends.moe import unfuse_experts
from qcompiler.frontends.multimodal import auto_model_class
from qcompiler.kernels.ascend import layout
from qcompiler.runtime.kv_attention import KvGrid, install_kv_cache_grids, quantize_sdpa_operands


class NpuLinear(torch.nn.Module):
    """One quantized linear as its NPU call sequence (prepared tensors are buffers)."""

    def __init__(self, kind: str, params: dict[str, torch.Tensor | int | None]):
        super().__init__()
        self.kind = kind
        self.consts = {k: v for k, v in params.items() if not isinstance(v, torch.Tensor)}
        for k, v in params.items():
            if isinstance(v, torch.Tensor):
                self.register_buffer(k, v)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        params = dict(self.consts) | {k: v for k, v in self.named_buffers()}
        return layout.forward(self.kind, x, params)


def read_folder(folder: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(description, every tensor) of an ascend v1 folder (single file or sharded with an index)."""
    desc_file = folder / DESCRIPTION
    if not desc_file.is_file():
        raise ArtifactError(f"'{folder}' has no {DESCRIPTION}: not an msModelSlim ascend v1 folder")
    desc = json.loads(desc_file.read_text())
    index = folder / "quant_model_weights.safetensors.index.json"
    files = (sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file()
             else ["quant_model_weights.safetensors"])
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        tensors.update(load_file(str(folder / f)))
    undescribed = sorted(set(tensors) - set(desc))
    if undescribed:
        raise ArtifactError(f"'{desc_file}' gives no type for tensors {undescribed[:5]}")
    return desc, tensors


def load_msmodelslim(folder: str | Path, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    from transformers import AutoConfig

    folder = Path(folder)
    desc, tensors = read_folder(folder)
    dit = diffusers_class(folder)
    if dit is not None:  # a diffusion transformer: built by its diffusers class from config.json (MindIE's DiT case)
        import diffusers

        cls = getattr(diffusers, dit)  # (diffusers_class refused every class but DIT_CLASSES)
        model = cls.from_config(cls.load_config(str(folder))).to(dtype)
        config = SimpleNamespace()
    else:
        config = AutoConfig.from_pretrained(str(folder), trust_remote_code=False)
        model = auto_model_class(config).from_config(config, dtype=dtype, trust_remote_code=False)
        # MoE: transformers' stacked experts become one linear per expert under the folder's names (as our frontend
        # does)
        unfuse_experts(model, SimpleNamespace(path=folder, weight_map=dict.fromkeys(tensors, "")),
                       find_blocks(model)[0])
    fa_grids = fa_quant_grids(folder, desc, tensors)
    c8_grids = c8_cache_grids(folder, model, desc, tensors)
    # W16A16S: a float (2:4-sparse) weight, loaded as it is
    quantized = {name.removesuffix(".weight"): kind for name, kind in desc.items()
                 if name.endswith(".weight") and isinstance(kind, str) and kind not in ("FLOAT", "W16A16S")}
    for module_name, kind in quantized.items():
        prefix = module_name + "."
        layer_tensors = {k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)}
        params = layout.prepare(kind, layer_tensors, int(desc.get("group_size") or 0))
        parent, leaf = module_name.rsplit(".", 1)
        setattr(model.get_submodule(parent), leaf, NpuLinear(kind, params))
    float_tensors = {k: v.to(dtype) for k, v in tensors.items() if desc.get(k) in ("FLOAT", "W16A16S")
                     and k.rsplit(".", 1)[0] not in quantized}
    missing, unexpected = model.load_state_dict(float_tensors, strict=False, assign=True)  # (unfused experts: meta)
    # (buffers the model computes when it is built — rotary tables, MiniMax's decay factors — are not in
    # checkpoints, as transformers loads them too)
    computed = {n for n, _ in model.named_buffers()}
    missing = [m for m in missing if not (m == "lm_head.weight" and getattr(config, "tie_word_embeddings", False))
               and m.rsplit(".", 1)[0] not in quantized and m not in computed]
    if missing or unexpected:
        raise ArtifactError(f"'{folder}': tensors missing {missing[:5]} / not in the model {unexpected[:5]}")
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    for module_name, grid in fa_grids.items():
        install_fa_quant(folder, model, module_name, grid)
    if c8_grids:
        install_kv_cache_grids(model, c8_grids, f"'{folder}'")
    return model.eval()


def c8_cache_grids(folder: Path, model: torch.nn.Module, desc: dict, tensors: dict[str, torch.Tensor]
                   ) -> dict[str, dict[str, KvGrid]]:
    """The C8 KV-cache grids by attention module: `<attn>.k_proj.kv_cache_scale` / `.kv_cache_offset` fp32 [H_kv·D]
    (v_proj's likewise), the cache holding q = clamp(round(x / s) + offset, −128, 127), laid over K / V [B, H_kv, S, D]
    as [1, H_kv, 1, D]."""
    grids: dict[str, dict[str, KvGrid]] = {}
    for name, kind in desc.items():
        if kind != "C8" or not name.endswith(".kv_cache_scale"):
            continue
        attention, proj, _ = name.rsplit(".", 2)
        offset = name.removesuffix("scale") + "offset"
        if proj not in ("k_proj", "v_proj") or desc.get(offset) != "C8" or name not in tensors or offset not in tensors:
            raise ArtifactError(f"'{folder}': C8 tensor '{name}' is not k_proj / v_proj.kv_cache_scale with its "
                                "kv_cache_offset in the weights; export the folder again")
        try:
            module = model.get_submodule(attention)
        except AttributeError:
            raise ArtifactError(f"'{folder}': C8 scales name attention '{attention}', which the model does not "
                                "have") from None
        head_dim = int(getattr(module, "head_dim", 0) or getattr(module, "head_size", 0))  # (GPT-NeoX: head_size)
        scale, zero = tensors[name].float(), tensors[offset].float()
        if head_dim <= 0 or scale.numel() % head_dim or scale.shape != zero.shape:
            raise ArtifactError(f"'{folder}': C8 tensor '{name}' {list(scale.shape)} is not one value per channel "
                                f"of {attention}'s cache (head_dim {head_dim})")
        shape = (1, scale.numel() // head_dim, 1, head_dim)
        grids.setdefault(attention, {})[proj[0]] = KvGrid(scale.reshape(shape), zero.reshape(shape), -128, 127)
    return grids


FaGrid = dict[str, tuple[torch.Tensor, torch.Tensor]]  # "q" / "k" / "v" -> (scale, signed offset) [heads, head_dim]


def fa_quant_grids(folder: Path, desc: dict, tensors: dict[str, torch.Tensor]) -> dict[str, FaGrid]:
    """The FAQuant grids of the folder by attention module (export/msmodelslim.py: <attn>.fa_q.scale, ...)."""
    grids: dict[str, FaGrid] = {}
    for name, kind in desc.items():
        if kind != "FAQuant" or not name.endswith(".scale"):
            continue
        module, holder, _ = name.rsplit(".", 2)
        offset = f"{module}.{holder}.offset"
        if holder not in FA_MODULES or desc.get(offset) != "FAQuant" or name not in tensors or offset not in tensors:
            raise ArtifactError(f"'{folder}': FAQuant tensor '{name}' is not fa_q / fa_k / fa_v.scale with its offset "
                                "in the weights; export the folder again")
        grids.setdefault(module, {})[holder.removeprefix("fa_")] = (tensors[name].float(), tensors[offset].float())
    for module, grid in grids.items():
        if set(grid) != {"q", "k", "v"}:
            raise ArtifactError(f"'{folder}': attention '{module}' has FAQuant grids for {sorted(grid)}, not Q, K and V")
    return grids


def install_fa_quant(folder: Path, model: torch.nn.Module, module_name: str, grid: FaGrid) -> None:
    """Make the attention `module_name` run its scaled-dot-product attention on Q, K and V in int8, as the FA3
    kernel reads them: x̂ = (clamp(round(x / s) + offset, −128, 127) − offset)·s per (head, channel) of x [B, H, S, D].
    (Emulated by swapping torch's SDPA for the length of the module's call: diffusers' attention processors call it.)"""
    try:
        module = model.get_submodule(module_name)
    except AttributeError:
        raise ArtifactError(f"'{folder}': FAQuant scales name attention '{module_name}', which the model does not "
                            "have") from None
    def fake_quant(x: torch.Tensor, which: str) -> torch.Tensor:
        scale, offset = grid[which]
        if x.dim() != 4 or tuple(x.shape[1::2]) != tuple(scale.shape):
            raise ArtifactError(f"'{folder}': attention '{module_name}': {which} is {list(x.shape)}, its FAQuant grid "
                                f"{list(scale.shape)} (heads, head_dim)")
        s, o = scale[None, :, None, :], offset[None, :, None, :]
        return ((torch.clamp(torch.round(x.float() / s) + o, -128, 127) - o) * s).to(x.dtype)

    quantize_sdpa_operands(module, lambda q, k, v: (fake_quant(q, "q"), fake_quant(k, "k"), fake_quant(v, "v")),
                           f"'{folder}': attention '{module_name}'",
                           "the FAQuant emulation cannot quantize its Q, K and V")
