"""Quantization schemes: frozen, validated dataclasses with the industry's preset names.

A scheme says *what* numbers a layer ends up with; passes say *how* they are found (RTN, SmoothQuant, ...)
and targets say *whether* they can run them.

Weight quantization of a row w (one output channel, length K) with group size g splits K into
ceil(K / g) groups; the last group is shorter when g does not divide K (handled everywhere, never padded
in the stored tensors). Symmetric: q = clamp(round(w / s), -2^(b-1), 2^(b-1) - 1), w ≈ q·s.
Asymmetric: q = clamp(round(w / s) + z, 0, 2^b - 1), w ≈ (q - z)·s.
Float (type "float", fp8 e4m3): s = absmax / 448, q = e4m3(clamp(w / s, ±448)) (round to nearest even on the
e4m3 grid), w ≈ q·s; per tensor or per channel for weights, static per tensor or dynamic per token for
activations.
KV cache (`kv_cache`, passes/kv_cache/kv_quant.py): K after the rotary embedding and V as attention reads
them, [B, H_kv, S, D], int8 or int4, static scales per tensor / per head [H_kv] / per channel [H_kv, D] or
dynamic per token and head (one scale per (b, h, s) over D), symmetric or asymmetric; the same grid formulas.
2:4 sparsity (`sparsity="2:4"`): in every group of 4 consecutive input weights of a row at most 2 are non-zero.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from dataclasses import dataclass, field
from typing import Literal

from qcompiler.errors import SchemeError

Granularity = Literal["tensor", "channel", "group", "token", "head"]  # "head": KV cache only
NumberType = Literal["int", "float"]
FP8_E4M3_MAX = 448.0  # the largest finite float8_e4m3fn


@dataclass(frozen=True)
class QuantArgs:
    """How one tensor (weights or activations) is quantized."""

    bits: int = 8
    symmetric: bool = True
    granularity: Granularity = "channel"
    group_size: int | None = None  # only for granularity == "group"
    dynamic: bool = False  # activations: scales computed at run time (per token) instead of calibrated
    type: NumberType = "int"  # "float": fp8 e4m3 (bits 8, symmetric, no groups)

    def __post_init__(self) -> None:
        if self.bits not in (4, 8):
            raise SchemeError(f"bits={self.bits} is not supported; use 4 or 8")
        if self.type == "float" and (self.bits != 8 or not self.symmetric or self.granularity == "group"):
            raise SchemeError("float quantization is fp8 e4m3: bits=8, symmetric, per tensor/channel/token (no groups)")
        if self.granularity == "group":
            if self.group_size is None or self.group_size <= 0:
                raise SchemeError("granularity 'group' needs a positive group_size (e.g. 64 or 128)")
        elif self.group_size is not None:
            raise SchemeError(f"group_size is only valid with granularity 'group', not '{self.granularity}'")
        if self.granularity == "token" and not self.dynamic:
            raise SchemeError("per-token activation quantization is dynamic by nature: set dynamic=True")

    @property
    def is_float(self) -> bool:
        return self.type == "float"

    @property
    def qmin(self) -> int:
        if self.is_float:
            return -int(FP8_E4M3_MAX)
        return -(2 ** (self.bits - 1)) if self.symmetric else 0

    @property
    def qmax(self) -> int:
        if self.is_float:
            return int(FP8_E4M3_MAX)
        return 2 ** (self.bits - 1) - 1 if self.symmetric else 2**self.bits - 1

    def describe(self) -> str:
        g = f"g{self.group_size}" if self.granularity == "group" else self.granularity
        if self.is_float:
            return f"fp8e4m3-{g}{'-dyn' if self.dynamic else ''}"
        return f"int{self.bits}-{'sym' if self.symmetric else 'asym'}-{g}{'-dyn' if self.dynamic else ''}"


DEFAULT_IGNORE = ("lm_head", "router")


def layer_matches(pattern: str, name: str, role: str) -> bool:
    """A layer pattern is a graph role ("down", "qkv"), a glob on the checkpoint name
    ("model.layers.0.*"), or a checkpoint name / dotted suffix of one ("mlp.down_proj", "lm_head")."""
    if pattern == role:
        return True
    if any(c in pattern for c in "*?["):
        return fnmatch.fnmatchcase(name, pattern)
    return name == pattern or name.endswith("." + pattern)


@dataclass(frozen=True)
class QuantScheme:
    """A layer's quantization: weight args (None: weights stay float, w16a16s), optional activation args
    (None = weight-only), optional KV-cache args and an optional N:M weight sparsity ("2:4").

    Mixed precision: `overrides` maps layer patterns (see `layer_matches`) to another scheme or to None
    (float), first match wins; `ignore` patterns stay float and are checked first. The KV cache is a property
    of the model, not of a layer: only the top-level scheme's `kv_cache` counts.
    """

    name: str
    weights: QuantArgs | None
    activations: QuantArgs | None = None
    # Linears left in float (matched against role or the checkpoint name suffix): lm_head by convention, and
    # MoE routers (role "router", ir/analysis.py): tiny, and their top-k decisions are sensitive to error.
    ignore: tuple[str, ...] = field(default=DEFAULT_IGNORE)
    overrides: tuple[tuple[str, QuantScheme | None], ...] = ()
    kv_cache: QuantArgs | None = None
    sparsity: str | None = None  # "2:4": every 4 consecutive weights of a row hold at most 2 non-zeros

    def __post_init__(self) -> None:
        w, a = self.weights, self.activations
        if w is None:
            if a is not None:
                raise SchemeError(f"scheme '{self.name}': float weights with quantized activations have no kernel")
            if self.sparsity is None and self.kv_cache is None:
                raise SchemeError(f"scheme '{self.name}': no weights, sparsity or KV cache to quantize: nothing to do")
        elif w.granularity in ("token", "head"):
            raise SchemeError(f"scheme '{self.name}': weights cannot be quantized per {w.granularity}")
        if self.sparsity not in (None, "2:4"):
            raise SchemeError(f"scheme '{self.name}': sparsity '{self.sparsity}' is not supported; use '2:4'")
        if a is not None:
            if a.granularity not in ("tensor", "token"):
                raise SchemeError(
                    f"scheme '{self.name}': activations must be per-tensor (static) or per-token (dynamic)"
                )
            if a.bits == 4 and not (a.dynamic and a.symmetric and w is not None and w.bits == 4 and not w.is_float):
                raise SchemeError(f"scheme '{self.name}': 4-bit activations are symmetric per-token (dynamic) "
                                  "with int4 weights (w4a4)")
        if w is not None and w.is_float and (a is None or not a.is_float):
            raise SchemeError(f"scheme '{self.name}': fp8 weights run in an fp8 × fp8 GEMM: quantize the "
                              "activations to fp8 too")
        if a is not None and a.is_float and (w is None or not w.is_float):
            raise SchemeError(f"scheme '{self.name}': fp8 activations need fp8 weights")
        kv = self.kv_cache
        if kv is not None:
            if kv.is_float or kv.granularity == "group":
                raise SchemeError(f"scheme '{self.name}': the KV cache is int8 or int4 per tensor, head, channel "
                                  "or (dynamic) token")
            if kv.dynamic != (kv.granularity == "token"):
                raise SchemeError(f"scheme '{self.name}': KV-cache scales are dynamic exactly when per token")

    @property
    def weight_only(self) -> bool:
        return self.activations is None

    def for_layer(self, name: str, role: str) -> QuantScheme | None:
        """The scheme of the layer with checkpoint name `name` and graph role `role`; None = float."""
        if any(layer_matches(p, name, role) for p in self.ignore):
            return None
        for pattern, scheme in self.overrides:
            if layer_matches(pattern, name, role):
                return scheme
        return self

    def with_overrides(self, overrides: list[tuple[str, QuantScheme | None]], first: bool = False) -> QuantScheme:
        """Add overrides after the existing ones (or before them with first=True: they then win)."""
        for _, s in overrides:
            if s is not None and s.overrides:
                raise SchemeError(f"an override scheme cannot have overrides of its own ('{s.name}')")
        new = tuple(overrides)
        return dataclasses.replace(self, overrides=new + self.overrides if first else self.overrides + new)

    def all_schemes(self) -> list[QuantScheme]:
        """This scheme and every override scheme (what a target must be able to run)."""
        return [self] + [s for _, s in self.overrides if s is not None]

    def with_weights(self, **changes: object) -> QuantScheme:
        if self.weights is None:
            raise SchemeError(f"scheme '{self.name}' keeps its weights in float: no weight options apply")
        return dataclasses.replace(self, weights=dataclasses.replace(self.weights, **changes))  # type: ignore[arg-type]

    @property
    def weight_bits(self) -> int | None:
        return None if self.weights is None else self.weights.bits

    def describe(self) -> str:
        a = self.activations.describe() if self.activations else "float"
        text = f"{self.name}: weights {self.weights.describe() if self.weights else 'float'}, activations {a}"
        if self.sparsity:
            text += f", {self.sparsity} sparse"
        if self.kv_cache:
            text += f", kv cache {self.kv_cache.describe()}"
        if self.overrides:
            text += "; overrides " + ", ".join(f"{p}={s.name if s else 'float'}" for p, s in self.overrides)
        return text

    def to_dict(self) -> dict[str, object]:
        return dataclasses.asdict(self)

    @staticmethod
    def from_dict(d: dict) -> QuantScheme:
        acts, weights, kv = d.get("activations"), d.get("weights"), d.get("kv_cache")
        return QuantScheme(
            name=d["name"],
            weights=QuantArgs(**weights) if weights else None,
            activations=QuantArgs(**acts) if acts else None,
            kv_cache=QuantArgs(**kv) if kv else None,
            sparsity=d.get("sparsity"),
            ignore=tuple(d.get("ignore", DEFAULT_IGNORE)),
            overrides=tuple(
                (str(p), QuantScheme.from_dict(o) if o else None) for p, o in d.get("overrides", ())
            ),
        )


PRESETS: dict[str, QuantScheme] = {
    "w8a16": QuantScheme("w8a16", QuantArgs(bits=8, granularity="channel")),
    "w4a16": QuantScheme("w4a16", QuantArgs(bits=4, granularity="group", group_size=128)),
    "w8a8": QuantScheme(
        "w8a8",
        QuantArgs(bits=8, granularity="channel"),
        QuantArgs(bits=8, granularity="tensor", symmetric=True, dynamic=False),
    ),
    "w8a8_dynamic": QuantScheme(
        "w8a8_dynamic",
        QuantArgs(bits=8, granularity="channel"),
        QuantArgs(bits=8, granularity="token", symmetric=True, dynamic=True),
    ),
    # int4 weights per output channel (held in int8) × int8 activations per token (msModelSlim W4A8_DYNAMIC)
    "w4a8": QuantScheme(
        "w4a8",
        QuantArgs(bits=4, granularity="channel"),
        QuantArgs(bits=8, granularity="token", symmetric=True, dynamic=True),
    ),
    # int4 weights per channel × int4 activations per token (msModelSlim W4A4_DYNAMIC); the default pipeline
    # rotates first (the `rotate` pass): without it the activations' outliers ruin the 4-bit grid
    "w4a4": QuantScheme(
        "w4a4",
        QuantArgs(bits=4, granularity="channel"),
        QuantArgs(bits=4, granularity="token", symmetric=True, dynamic=True),
    ),
    # fp8 e4m3 weights per output channel × activations per token at run time (vLLM's FP8_DYNAMIC)
    "fp8": QuantScheme(
        "fp8",
        QuantArgs(bits=8, granularity="channel", type="float"),
        QuantArgs(bits=8, granularity="token", dynamic=True, type="float"),
    ),
    # fp8 e4m3 weights per output channel × a calibrated per-tensor activation scale
    "fp8_static": QuantScheme(
        "fp8_static",
        QuantArgs(bits=8, granularity="channel", type="float"),
        QuantArgs(bits=8, granularity="tensor", type="float"),
    ),
}
# The KV cache of the C8 presets: int8, one calibrated scale per channel (head × head_dim), symmetric (the
# msModelSlim C8 layout and onnxruntime's quantized GroupQueryAttention cache both take it).
KV_C8 = QuantArgs(bits=8, granularity="channel", symmetric=True)
PRESETS["w8a8c8"] = dataclasses.replace(PRESETS["w8a8"], name="w8a8c8", kv_cache=KV_C8)
PRESETS["w4a8c8"] = dataclasses.replace(PRESETS["w4a8"], name="w4a8c8", kv_cache=KV_C8)
# 2:4 sparse weights: int8 per channel × int8 static activations (msModelSlim W8A8S), or kept float (W16A16S)
PRESETS["w8a8s"] = dataclasses.replace(PRESETS["w8a8"], name="w8a8s", sparsity="2:4")
PRESETS["w16a16s"] = QuantScheme("w16a16s", None, sparsity="2:4")

def with_grid(args: QuantArgs | None, bits: int | None = None, group_size: int | None = None,
              symmetric: bool | None = None) -> QuantArgs | None:
    """Weight args with the grid options that are set applied (group_size ≤ 0: one scale per output channel)."""
    if args is None:
        return None
    changes: dict[str, object] = {}
    if bits is not None:
        changes["bits"] = bits
    if group_size is not None:
        changes.update({"granularity": "group", "group_size": group_size} if group_size > 0
                       else {"granularity": "channel", "group_size": None})
    if symmetric is not None:
        changes["symmetric"] = symmetric
    return dataclasses.replace(args, **changes) if changes else args  # type: ignore[arg-type]


def int_gemm_reason(scheme: QuantScheme) -> str | None:
    """Why the integer GEMM (int8 activations × integer weights, one scale per token/tensor × one per output
    channel) cannot run `scheme`'s layers, or None. Weights: symmetric per channel, int8, or int4 held in int8
    (w4a8) with dynamic per-token activations."""
    w, a = scheme.weights, scheme.activations
    if a is None or a.is_float or w is None:
        return None
    if w.is_float or not w.symmetric or w.granularity not in ("channel", "group"):
        return "the int8 GEMM needs symmetric per-channel integer weights (int8, or int4 with dynamic activations)"
    if a.bits == 4 and (w.bits != 4 or w.granularity != "channel"):
        return "int4 activations run in the int4 GEMM with int4 per-channel weights only (w4a4)"
    if w.granularity == "group" and not (w.bits == 4 and a.dynamic and a.bits == 8):
        return "group-wise weight scales in the integer GEMM: int4 weights × int8 per-token activations only (w4a8)"
    if w.bits == 4 and not a.dynamic:
        return "int4 weights with int8 activations are served with dynamic per-token activations only (w4a8)"
    return None


def parse_kv_cache(text: str) -> QuantArgs | None:
    """'int8' | 'int4', optionally '-tensor' / '-head' / '-channel' (default) / '-token' (dynamic per token and
    head) and '-asym'; 'none' / 'float' keeps the KV cache in float. E.g. 'int8-head', 'int4-token-asym'."""
    parts = text.lower().split("-")
    if parts[0] in ("none", "float", "fp16", "bf16") and len(parts) == 1:
        return None
    if parts[0] not in ("int8", "int4"):
        raise SchemeError(f"KV cache '{text}': start with int8 or int4 (e.g. int8, int8-head, int4-token-asym)")
    granularity, symmetric = "channel", True
    for part in parts[1:]:
        if part in ("tensor", "head", "channel", "token"):
            granularity = part
        elif part in ("sym", "asym"):
            symmetric = part == "sym"
        else:
            raise SchemeError(f"KV cache '{text}': unknown part '{part}' (tensor|head|channel|token, sym|asym)")
    return QuantArgs(bits=int(parts[0][3:]), granularity=granularity, symmetric=symmetric,  # type: ignore[arg-type]
                     dynamic=granularity == "token")


def get_scheme(name: str, *, group_size: int | None = None, symmetric: bool | None = None,
               act_symmetric: bool | None = None, kv_cache: str | None = None) -> QuantScheme:
    """Look up a preset by name, optionally overriding the weight group size / symmetry, the symmetry of
    static activations (an asymmetric grid with a zero point suits one-sided inputs such as SiLU·up's) and the
    KV cache (`parse_kv_cache`; 'none' removes a preset's)."""
    key = name.lower().replace("-", "_")
    if key not in PRESETS:
        raise SchemeError(f"unknown scheme '{name}'; available: {', '.join(PRESETS)}")
    scheme = PRESETS[key]
    if group_size is not None:
        if group_size <= 0:
            scheme = scheme.with_weights(granularity="channel", group_size=None)
        else:
            scheme = scheme.with_weights(granularity="group", group_size=group_size)
    if symmetric is not None:
        scheme = scheme.with_weights(symmetric=symmetric)
    if act_symmetric is False:
        acts = scheme.activations
        if acts is None or acts.dynamic or acts.is_float:
            raise SchemeError(f"scheme '{name}' has no static integer activations to make asymmetric "
                              "(asymmetric activations: w8a8)")
        scheme = dataclasses.replace(scheme, activations=dataclasses.replace(acts, symmetric=False))
    if kv_cache is not None:
        scheme = dataclasses.replace(scheme, kv_cache=parse_kv_cache(kv_cache))
    return scheme


def parse_override(text: str) -> tuple[str, QuantScheme | None]:
    """'PATTERN=SCHEME' (a preset name, or 'float') -> (pattern, scheme or None)."""
    if "=" not in text:
        raise SchemeError(f"override '{text}' must look like PATTERN=SCHEME, e.g. 'down=w8a16' or "
                          "'model.layers.0.*=float'")
    pattern, name = (t.strip() for t in text.rsplit("=", 1))
    if not pattern:
        raise SchemeError(f"override '{text}' has an empty layer pattern")
    if name.lower() in ("float", "none", "fp", "bf16", "fp16"):
        return pattern, None
    return pattern, get_scheme(name)
