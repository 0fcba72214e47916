"""A learned residual rotation (SpinQuant's R1): the orthogonal R of the `rotate` pass fitted to the model under
quantization, instead of a random Hadamard rotation.

The rotate pass computes the same function for every orthogonal R (passes/rotation/rotate.py); which R it uses
only changes what the quantized linears see. Here R is trained, on the calibration tokens, to minimise the
next-token cross-entropy of the model as the quantized model computes it:

  R = R₀·C(A),  C(A) = (I − A)(I + A)⁻¹,  A = B − Bᵀ          (Cayley: orthogonal for every B; C(0) = I)

so the search starts at QuaRot's randomized Hadamard R₀ and never leaves the orthogonal group; Adam updates B.
In the forward pass every norm's multiplier γ is folded into the linears reading it and the stream is rotated:

  embeddings        e ← e·R                      (a hook on the embedding's output)
  stream readers    W ← q_w(W·diag(γ)·R)         (q/k/v, gate/up — the linears after each RMSNorm, γ ← 1)
  stream writers    W ← q_w(Rᵀ·W·H), b ← b·R     (o_proj, down_proj; H the online Hadamard of their input)
  final norm        h ← h·Rᵀ before it           (its γ and the head stay as they are: n(h·R)·Rᵀ = n(h))
  every block linear reads q_a(x) (x·H first for o_proj and down_proj)

where q_w is round-to-nearest on the scheme's weight grid and q_a the scheme's per-token activation grid, both
with straight-through gradients (∂q(x)/∂x = I). Without q_w and q_a this model is the float model exactly (up to
float rounding) for every B: the loss only sees quantization error. Afterwards the rotate pass uses R (float64)
in every block and outside them, and GPTQ quantizes the rotated weights (SpinQuant: RTN while learning, GPTQ
after).

Needs the whole float model in memory (a forward and backward pass over it per step) and Llama-style layers: an
RMSNorm `input_layernorm` before attention linears, `post_attention_layernorm` before MLP linears, `o_proj` and
`down_proj` writing into the stream; anything else is refused by name (`layout_refusal`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from qcompiler.algorithms.hadamard import normalized_hadamard
from qcompiler.errors import ArtifactError
from qcompiler.numerics import (
    fake_quant_act_per_token,
    fake_quant_weight,
    module_norm_multiplier,
    mse_clip_search,
)
from qcompiler.schemes import QuantArgs

WRITERS = ("self_attn.o_proj", "mlp.down_proj")
NORM_READERS = {"input_layernorm": "self_attn", "post_attention_layernorm": "mlp"}  # norm -> the module it feeds


@dataclass
class LayerLinears:
    """The linears of one decoder layer by their role in the residual stream (module paths in the layer)."""

    readers: dict[str, list[str]]  # norm path -> the linears reading it
    writers: list[str]


def cayley(b: torch.Tensor) -> torch.Tensor:
    """C(A) = (I − A)(I + A)⁻¹ for A = B − Bᵀ: orthogonal for every square B (A skew-symmetric), C = I at B = 0."""
    a = b - b.t()
    eye = torch.eye(b.shape[0], dtype=b.dtype)
    return torch.linalg.solve(eye + a, eye - a, left=False)


def straight_through(x: torch.Tensor, quantized: torch.Tensor) -> torch.Tensor:
    """quantized in the forward pass, the identity's gradient in the backward pass."""
    return x + (quantized - x).detach()


def layer_linears(layer: nn.Module) -> LayerLinears | str:
    """The layer's linears by role, or why the layer is not a Llama-style pre-norm layer the training reads."""
    readers: dict[str, list[str]] = {}
    extra = [n for n, _ in layer.named_children() if "norm" in n.lower() and n not in NORM_READERS]
    if extra:
        return f"it has norms besides the two pre-norms ({', '.join(extra)}: post-norms do not commute with R)"
    for norm, owner in NORM_READERS.items():
        if not isinstance(getattr(layer, norm, None), nn.Module) or not hasattr(getattr(layer, norm), "weight"):
            return f"it has no '{norm}' norm with a weight"
        if getattr(getattr(layer, norm), "bias", None) is not None:
            return f"its '{norm}' has a bias (a LayerNorm, which does not commute with a rotation)"
        sub = getattr(layer, owner, None)
        if sub is None:
            return f"it has no '{owner}' module"
        names = [f"{owner}.{n}" for n, m in sub.named_children() if isinstance(m, nn.Linear)
                 and f"{owner}.{n}" not in WRITERS]
        if not names:
            return f"its '{owner}' has no linear reading '{norm}'"
        readers[norm] = names
    modules = dict(layer.named_modules())
    for w in WRITERS:
        if not isinstance(modules.get(w), nn.Linear):
            return f"it has no linear '{w}'"
    return LayerLinears(readers, list(WRITERS))


def layout_refusal(model: nn.Module, layers: Sequence[nn.Module]) -> str | None:
    """Why the rotation cannot be learned on this model (None: it can)."""
    for i, layer in enumerate(layers):
        found = layer_linears(layer)
        if isinstance(found, str):
            return (f"learning the rotation reads Llama-style decoder layers; layer {i} "
                    f"({type(layer).__name__}) of '{model.config.model_type}': {found}")
    base = model.get_decoder() if hasattr(model, "get_decoder") else None
    if base is None or not isinstance(getattr(base, "norm", None), nn.Module):
        return "learning the rotation needs the decoder's final norm named 'norm'"
    return None


@contextmanager
def _hooks(handles: list[Any]) -> Iterator[None]:
    try:
        yield
    finally:
        for h in handles:
            h.remove()


class QuantizedRotatedModel:
    """`model` (float32, every weight loaded; decoder layers `layers`, module `prefix`.i) as the quantized model
    computes it after the rotation R: `loss(ids, r)` is differentiable in r (see the module docstring)."""

    def __init__(self, model: nn.Module, prefix: str, layers: Sequence[nn.Module], weight_args: QuantArgs | None,
                 act_args: QuantArgs | None, online: bool = True, clip_grid: int = 0):
        self.model, self.weight_args, self.act_args, self.clip_grid = model, weight_args, act_args, clip_grid
        d = model.get_input_embeddings().weight.shape[1]
        self.fixed: dict[str, torch.Tensor] = {}  # parameter -> its value in every step (norm multipliers folded away)
        self.readers: dict[str, torch.Tensor] = {}  # weight name -> W·diag(γ) (float32)
        self.writers: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}  # weight name -> (W·H, bias)
        self.online_h: dict[nn.Module, torch.Tensor] = {}  # writer -> H applied to its input
        self.quantized: list[nn.Module] = []
        for i, layer in enumerate(layers):
            lay = layer_linears(layer)
            assert not isinstance(lay, str)  # (layout_refusal first)
            base = f"{prefix}.{i}"
            for norm_path, names in lay.readers.items():
                norm = layer.get_submodule(norm_path)
                gamma = module_norm_multiplier(norm, d).float()
                # the norm computes n(h) (multiplier 1): weight − (γ − 1) is 1 for γ and 0 for Gemma's 1 + γ
                self.fixed[f"{base}.{norm_path}.weight"] = (norm.weight.detach().float() - (gamma - 1.0)).to(
                    norm.weight.dtype)
                for n in names:
                    lin = layer.get_submodule(n)
                    self.readers[f"{base}.{n}.weight"] = lin.weight.detach().float() * gamma[None, :]
                    self.quantized.append(lin)
            for n in lay.writers:
                lin = layer.get_submodule(n)
                w = lin.weight.detach().float()
                h = normalized_hadamard(w.shape[1]) if online else None
                if h is not None:
                    self.online_h[lin] = h.float()
                    w = w @ self.online_h[lin]
                self.writers[f"{base}.{n}.weight"] = (w, None if lin.bias is None else lin.bias.detach().float())
                self.quantized.append(lin)
        self.r = torch.eye(d)  # the rotation of the current call, read by the hooks

    def _wq(self, w: torch.Tensor) -> torch.Tensor:
        if self.weight_args is None:
            return w
        wd = w.detach()
        ratio: torch.Tensor | float = 1.0
        if self.clip_grid and self.weight_args.granularity != "tensor":
            ratio = mse_clip_search(wd, self.weight_args, grid=self.clip_grid)
        return straight_through(w, fake_quant_weight(wd, self.weight_args, ratio))

    def _embed_hook(self, _m: nn.Module, _args: Any, out: torch.Tensor) -> torch.Tensor:
        return out @ self.r

    def _final_norm_hook(self, _m: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        return (args[0] @ self.r.t(), *args[1:])

    def _input_hook(self, mod: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        x = args[0]
        if mod in self.online_h:
            x = x @ self.online_h[mod]
        if self.act_args is not None:
            x = straight_through(x, fake_quant_act_per_token(x.detach(), self.act_args.bits))
        return (x, *args[1:])

    def loss(self, ids: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        """The next-token cross-entropy on token ids [B, S] of the model rotated by r, quantized."""
        self.r = r
        params: dict[str, torch.Tensor] = dict(self.fixed)
        for name, w in self.readers.items():
            params[name] = self._wq(w @ r)
        for name, (w, bias) in self.writers.items():
            params[name] = self._wq(r.t() @ w)
            if bias is not None:
                params[name[: -len("weight")] + "bias"] = bias @ r
        handles = [self.model.get_input_embeddings().register_forward_hook(self._embed_hook),
                   self.model.get_decoder().norm.register_forward_pre_hook(self._final_norm_hook),
                   *(m.register_forward_pre_hook(self._input_hook) for m in self.quantized)]
        with _hooks(handles):
            out = torch.func.functional_call(self.model, params, (ids,), {"labels": ids, "use_cache": False})
        return out.loss


def write_rotation(path: Path, r: torch.Tensor) -> None:
    """R in a safetensors file (written whole, then renamed: never a half-written file under that name)."""
    tmp = path.with_name(path.name + ".tmp")
    save_file({"rotation": r.double().contiguous()}, str(tmp))
    tmp.replace(path)


def read_rotation(path: Path, d: int) -> torch.Tensor:
    """R read back and checked: a d×d float64 orthogonal matrix (a state file is input like any other)."""
    try:
        r = load_file(str(path))["rotation"]
    except Exception as e:  # (a damaged or foreign file)
        raise ArtifactError(f"'{path}': not a learned rotation ({' '.join(str(e).split())[:120]}); run without "
                            "--resume to learn it again") from None
    if r.dtype != torch.float64 or tuple(r.shape) != (d, d) or not torch.isfinite(r).all() \
            or float((r.t() @ r - torch.eye(d, dtype=r.dtype)).abs().max()) > 1e-6:
        raise ArtifactError(f"'{path}': tensor 'rotation' is not a {d}×{d} float64 orthogonal matrix; run without "
                            "--resume to learn it again")
    return r


def training_bytes(model: nn.Module) -> int:
    """About what training holds: the float32 model, the rotated and fake-quantized weight copies with their
    gradients (3 more copies of the block weights), and the activations of one sequence."""
    n = sum(p.numel() for p in model.parameters())
    return 4 * n * 4 + (1 << 30)


def available_bytes() -> int | None:
    """MemAvailable of /proc/meminfo (None where there is none)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def learn_rotation(
    qmodel: QuantizedRotatedModel, batches: Sequence[torch.Tensor], r0: torch.Tensor, steps: int, lr: float,
    log: Callable[[str], None] | None = None,
) -> tuple[torch.Tensor, list[float]]:
    """(R float64 orthogonal, the training loss of each step): R₀·C(A) fitted by Adam on B, one calibration batch
    (token ids [B, S]) per step in turn."""
    b = torch.zeros(r0.shape, requires_grad=True)
    opt = torch.optim.Adam([b], lr=lr)
    r0f = r0.float()
    losses: list[float] = []
    t0 = time.perf_counter()
    for step in range(steps):
        loss = qmodel.loss(batches[step % len(batches)], r0f @ cayley(b))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        if log is not None and (step + 1) % max(1, steps // 5) == 0:
            log(f"learned rotation: step {step + 1}/{steps}, loss {losses[-1]:.4f} (first {losses[0]:.4f}), "
                f"{time.perf_counter() - t0:.0f} s")
    with torch.no_grad():
        r = r0.double() @ cayley(b.detach().double())
    return r, losses
