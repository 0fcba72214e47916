"""Load an LMDeploy folder (ours: export/lmdeploy.py) as a runnable model that computes what LMDeploy's engines
compute with it, built by transformers' class from config.json:

    smooth_quant (PyTorch engine W8A8 / fp8)   each linear with `weight` + `scale`: y = Q(x) · (weight · scale)ᵀ + b,
                                               Q(x) the per-token quantization at run time (int8: s_t = max|x_t| /
                                               127, round half to even, clamp to [−128, 127]; fp8: s_t = max|x_t| /
                                               448, a cast to e4m3), as LMDeploy's W8A8 linears and QRMSNorm do
    awq (TurboMind W4A16)                      each linear with `qweight` / `qzeros` / `scales`: the AutoAWQ gemm
                                               layout unpacked, ŵ = (u − z) · s, float activations

Used to evaluate the folders on the CPU (benchmarks/serving_formats.py) where LMDeploy itself does not run (its
package imports CUDA-only extensions). The tests check the folders against their own readers written from
LMDeploy's code, not against this one.
"""

from __future__ import annotations

from pathlib import Path

import torch

import qcompiler.kernels  # noqa: F401  (registers torch.ops.qc.*)
from qcompiler.errors import ArtifactError
from qcompiler.frontends.multimodal import auto_model_class
from qcompiler.numerics import fake_quant_act_per_token

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble i of a word holds column 8c + AWQ_ORDER[i]


def awq_unpack(words: torch.Tensor) -> torch.Tensor:
    """AutoAWQ gemm words [R, C] (int32) -> unsigned 4-bit codes [R, 8·C]."""
    w = words.to(torch.int64) & 0xFFFFFFFF
    out = torch.empty(words.shape[0], words.shape[1] * 8, dtype=torch.int64)
    for i, column in enumerate(AWQ_ORDER):
        out[:, column::8] = (w >> (4 * i)) & 0xF
    return out


def per_token(x: torch.Tensor, fp8: bool) -> torch.Tensor:
    """x quantized per token (last dimension) and back, as LMDeploy's W8A8 kernels read it: our dynamic per-token
    grids (int8 absmax / 127; fp8 absmax / 448 and an e4m3 cast)."""
    return torch.ops.qc.fake_quant_act_fp8_per_token(x) if fp8 else fake_quant_act_per_token(x, 8)


def load_lmdeploy(folder: str | Path, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """The LMDeploy folder as a transformers model computing what LMDeploy computes with it (module docstring)."""
    from safetensors.torch import load_file
    from transformers import AutoConfig

    folder = Path(folder)
    config = AutoConfig.from_pretrained(str(folder), trust_remote_code=False)
    quant = getattr(config, "quantization_config", None)
    if not isinstance(quant, dict) or quant.get("quant_method") not in ("smooth_quant", "awq"):
        raise ArtifactError(f"'{folder}/config.json' has no LMDeploy quantization_config (smooth_quant or awq)")
    del config.quantization_config
    fp8 = quant.get("quant_dtype") == "float8_e4m3fn"
    model = auto_model_class(config).from_config(config, dtype=dtype).eval()
    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    state = model.state_dict()
    loaded: set[str] = set()

    def put(name: str, value: torch.Tensor) -> None:
        if name not in state or tuple(state[name].shape) != tuple(value.shape):
            raise ArtifactError(f"'{folder}': tensor '{name}' {list(value.shape)} is not a parameter of "
                                f"{type(model).__name__} of that shape")
        state[name].copy_(value.to(dtype))
        loaded.add(name)

    with torch.no_grad():
        for name, t in tensors.items():
            module, _, leaf = name.rpartition(".")
            if leaf == "qweight":  # AWQ: [K, N/8] words, zeros [K/g, N/8], fp16 scales [K/g, N]
                u, z = awq_unpack(t), awq_unpack(tensors[f"{module}.qzeros"])
                s = tensors[f"{module}.scales"].float()
                group = u.shape[0] // s.shape[0]
                w = (u - z.repeat_interleave(group, 0)) * s.repeat_interleave(group, 0)
                put(f"{module}.weight", w.t())
            elif leaf in ("qzeros", "scales"):
                continue
            elif leaf == "weight" and f"{module}.scale" in tensors:  # smooth_quant: ŵ = weight · scale
                put(name, t.float() * tensors[f"{module}.scale"].float())
                model.get_submodule(module).register_forward_pre_hook(
                    lambda _m, args: (per_token(args[0], fp8), *args[1:]))
            elif leaf == "scale" and f"{module}.weight" in tensors:
                continue
            else:
                put(name, t.float())
    buffers = {n for n, _ in model.named_buffers()}  # (computed when the model is built: rotary tables)
    tied = getattr(config, "tie_word_embeddings", False)
    missing = [n for n in state if n not in loaded and n not in buffers and not (n == "lm_head.weight" and tied)]
    if missing:
        raise ArtifactError(f"'{folder}': tensors missing for {missing[:5]}")
    if tied:
        model.tie_weights()
    model.lmdeploy_quantization = dict(quant)  # type: ignore[assignment]
    return model
