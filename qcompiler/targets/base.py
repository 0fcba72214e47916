"""The target interface and registry. Targets hold no algorithm maths: they say what they support,
whether they want fused linears, and which rewrite rules lower quantized patterns to their kernels."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import torch
from torch import fx

from qcompiler.errors import SchemeError
from qcompiler.export.artifact import SavedExporter
from qcompiler.ir.records import KVRecord, LayerRecord
from qcompiler.schemes import QuantScheme, int_gemm_reason

if TYPE_CHECKING:
    from qcompiler.export.serving import ServingFormat
    from qcompiler.pm.rewrite import RewriteRule


def scheme_features(scheme: QuantScheme) -> list[str]:
    """The features of a scheme that some target cannot run (the keys of Target.refuses), in the order checked:
      float_sparse_weights  2:4-sparse float weights (w16a16s)
      fp8                   e4m3 weights × e4m3 activations
      w4a4                  int4 weights × int4 per-token activations
      w4a8                  int4 weights × int8 per-token activations (per channel or with group scales)
      per_tensor_weights    one weight scale per matrix"""
    w, a = scheme.weights, scheme.activations
    if w is None:
        return ["float_sparse_weights"]
    if w.is_float:
        return ["fp8"]
    out = []
    if a is not None and a.bits == 4:
        out.append("w4a4")
    elif a is not None and w.bits == 4:
        out.append("w4a8")
    if w.granularity == "tensor":
        out.append("per_tensor_weights")
    return out


class Target:
    """A backend, as data where it can be: the scheme features it refuses (with the reason), whether it fuses linears
    sharing an input and holds an online rotation; what every target shares (the integer-GEMM legality of
    schemes.int_gemm_reason, the lowering rules) lives here once. Logic stays in a target only where it is truly
    its own (`kernel_reason`: e.g. MatMulNBits' block sizes; the formats it writes)."""

    name: str = ""
    description: str = ""
    fuse_shared_input_linears: bool = False
    consumer: str = ""  # what loads the output (README matrix); targets writing several formats override consumers()
    # whether the target's runtime and formats hold qc::online_rotation (QuaRot's online Hadamard before down_proj)
    online_rotation: bool = True
    # whether they hold a learned transform before a linear (flatquant's qc::kronecker_transform + clip ratio)
    learned_transforms: bool = False
    # whether the default pipeline rotates the residual stream (QuaRot, online Hadamard included) before static int8
    # activations, where the model admits it (else SmoothQuant): the targets whose exports are checked rotated
    rotates_static_activations: bool = False
    refuses: ClassVar[dict[str, str]] = {}  # scheme feature (scheme_features) -> why this target cannot run it

    def unsupported_reason(self, scheme: QuantScheme) -> str | None:
        """None when the target can run `scheme`, else why not: a refused feature, the integer GEMM's legality,
        then the target's own kernel or format constraints."""
        for feature in scheme_features(scheme):
            if feature in self.refuses:
                return self.refuses[feature]
        return int_gemm_reason(scheme) or self.kernel_reason(scheme)

    def learned_transform_reason(self, scheme: QuantScheme) -> str | None:
        """Why this target cannot hold flatquant's learned transforms for `scheme` (None: it can)."""
        if not self.learned_transforms:
            return ("its formats hold no learned transform before a linear (flatquant's Kronecker transform and clip "
                    "ratio); use --target reference, or drop flatquant")
        return None

    def kernel_reason(self, scheme: QuantScheme) -> str | None:
        """A constraint of this target's kernels or formats that no feature names (default: none)."""
        return None

    def supported_schemes(self) -> list[str]:
        from qcompiler.schemes import PRESETS

        return [n for n, s in PRESETS.items() if self.unsupported_reason(s) is None]

    def validate(self, scheme: QuantScheme) -> None:
        reason = self.unsupported_reason(scheme)
        if reason is not None:
            raise SchemeError(
                f"target '{self.name}' cannot run scheme {scheme.describe()}: {reason}. "
                f"It runs: {', '.join(self.supported_schemes())}"
            )

    def lowering_rules(self) -> Sequence[RewriteRule]:
        """Quantized patterns -> qc:: kernel ops (every built-in target runs the same ops; their kernels differ)."""
        from qcompiler.passes.lowering.linear_rules import linear_rules

        return linear_rules()

    def check(self, scheme: QuantScheme, options: dict[str, str]) -> None:
        """Everything refusable before any work: each layer scheme, the options, the output formats."""
        for s in scheme.all_schemes():
            self.validate(s)
        self.check_options(options)
        self.check_export(scheme, options)

    def check_export(self, scheme: QuantScheme, options: dict[str, str]) -> None:
        """Refuse a scheme the chosen output format(s) cannot hold (targets that write formats override)."""

    def export_refusal(self, scheme: QuantScheme) -> str | None:
        """Why none of the target's output formats can hold `scheme` although the target runs it (None: some can)."""
        return None

    def consumers(self, scheme: QuantScheme) -> list[str]:
        """Who loads this target's output for `scheme` (empty when the target cannot run it)."""
        return [self.consumer] if self.unsupported_reason(scheme) is None else []

    def check_options(self, options: dict[str, str]) -> None:
        """Refuse unknown target options (before any work)."""
        if options:
            raise SchemeError(f"target '{self.name}' takes no --target-option (got {', '.join(options)})")

    def head_bits(self, options: dict[str, str]) -> int | None:
        """Bits of the output projection this target's format stores quantized by default (the plan then adds the
        quantize_head pass); None: the head stays as the scheme and pipeline leave it."""
        return None

    def check_model(self, config: Any, scheme: QuantScheme) -> None:
        """Refuse, before any work, a model (architecture, layer sizes) the target or its format cannot take."""

    def exporter(self, out_dir: Path, model: torch.nn.Module, options: dict[str, str], source: Path,
                 saved: SavedExporter | None = None) -> BlockExporter | None:
        """A writer of the target's own format into `out_dir` (the artefact's temporary folder), fed each lowered
        block; `source` is the input checkpoint folder (config, tokenizer). `saved`: continue from the state an
        earlier exporter of the same run saved (--resume) instead of starting. None: our artefact only."""
        return None


class BlockExporter(Protocol):
    """Receives lowered blocks in order while the driver runs; writes into the artefact's temporary folder.

    `save_state` records the exporter's progress after a block as JSON fields (binary parts as files whose
    names start with `tag`, in `folder`); the target's `exporter(..., saved=...)` continues from it. `finish`
    may run again after a kill part-way through it (a resumed run repeats it from the last block's state)."""

    def add_block(self, index: int, name: str, gm: fx.GraphModule, layers: Mapping[str, LayerRecord],
                  kv: Sequence[KVRecord]) -> None: ...

    def save_state(self, folder: Path, tag: str) -> dict[str, Any]: ...

    def finish(self, model: torch.nn.Module, metadata: dict[str, str]) -> None: ...

    def abort(self) -> None: ...


def linear_input_sizes(config: Any) -> dict[str, int]:
    """in_features of a decoder's linears by kind, from a transformers config: attention output, MLP and expert
    down projections, and multi-head latent attention's low-rank projections (DeepSeek's q_b_proj / kv_b_proj read
    the q / kv latents; its o_proj reads heads × v_head_dim). A vision-language model's: its language model's."""
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = getattr(config, "num_attention_heads", None)
    sizes = {"hidden_size (q/k/v, gate/up)": config.hidden_size}
    # (multi-head latent attention: o_proj reads heads × v_head_dim; head_dim there is the rotary part)
    head_dims = sorted({d for d in layer_values(config, "v_head_dim") if d}
                       or {d for d in layer_values(config, "head_dim") if d})
    if not head_dims and heads:
        head_dims = [config.hidden_size // heads]
    for head_dim in head_dims if heads else ():
        where = "" if len(head_dims) == 1 else f", layers of head_dim {head_dim}"
        sizes[f"num_attention_heads × head_dim (o_proj{where})"] = heads * head_dim
    for key, what in (("intermediate_size", "down_proj"), ("moe_intermediate_size", "experts' down_proj"),
                      ("shared_expert_intermediate_size", "shared expert's down_proj"),
                      ("q_lora_rank", "q_b_proj"), ("kv_lora_rank", "kv_b_proj"),
                      ("hidden_size_per_layer_input", "Gemma 4's per_layer_projection")):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            sizes[f"{key} ({what})"] = value
    return sizes


def layer_values(config: Any, key: str) -> list[Any]:
    """`key` of a config: its one value, or each layer's where transformers' config holds it per layer (Gemma 4's
    head_dim: sliding and full layers differ; reading the global value raises)."""
    if key in (getattr(config, "per_layer_attributes", None) or ()):
        view = config.per_layer_config
        return [getattr(view[i], key, None) for i in range(len(view))]
    return [getattr(config, key, None)]


def refuse_ragged_groups(target: str, consumer: str, config: Any, scheme: QuantScheme) -> None:
    """Serving kernels and their loaders need the weight group size to divide every layer's input size."""
    for s in scheme.all_schemes():
        if s.weights is None or s.weights.granularity != "group" or s.weights.group_size is None:
            continue
        g = s.weights.group_size
        for what, k in linear_input_sizes(config).items():
            if k % g:
                raise SchemeError(
                    f"target '{target}': group size {g} does not divide {what} = {k}, and {consumer} load only "
                    f"whole groups; choose a group size dividing {k} (e.g. --group-size {largest_power_of_two_divisor(k, g)}) or "
                    "per-channel scales (--group-size 0)"
                )


def refuse_oversized_groups(config: Any, scheme: QuantScheme) -> None:
    """A group size larger than every layer's input size would quantize per channel under a group scheme's name."""
    sizes = linear_input_sizes(config)
    for s in scheme.all_schemes():
        if s.weights is None or s.weights.granularity != "group" or s.weights.group_size is None:
            continue
        if s.weights.group_size > max(sizes.values()):
            raise SchemeError(
                f"group size {s.weights.group_size} is larger than every layer's input size "
                f"({', '.join(f'{k} = {v}' for k, v in sizes.items())}); choose a group size of at most "
                f"{max(sizes.values())}, or --group-size 0 for one scale per output channel"
            )


def refuse_mla_kv_cache(target: str, fmt: str, config: Any, scheme: QuantScheme) -> None:
    """A multi-head latent attention model (DeepSeek) caches a latent, for which `fmt` has no KV-cache scales."""
    if scheme.kv_cache is not None and getattr(config, "kv_lora_rank", None):
        raise SchemeError(f"target '{target}': {fmt} describes K/V caches, but this model's attention (MLA) caches "
                          "a compressed latent; quantize its KV cache with --target reference, or drop --kv-cache")


def largest_power_of_two_divisor(k: int, g: int) -> int:
    """The largest power of two ≤ g dividing k (what to suggest instead of g)."""
    d = 1
    while d * 2 <= g and k % (d * 2) == 0:
        d *= 2
    return d


_TARGETS: dict[str, Callable[[], Target]] = {}


def register_target(name: str) -> Callable[[type[Target]], type[Target]]:
    def deco(cls: type[Target]) -> type[Target]:
        cls.name = name
        _TARGETS[name] = cls
        return cls

    return deco


def choose_formats(options: dict[str, str], formats: Mapping[str, ServingFormat], default: str) -> list[ServingFormat]:
    """The formats `--target-option format=a,b` names (default: `default`), each one known."""
    names = [n.strip() for n in options.get("format", default).split(",") if n.strip()]
    unknown = [n for n in names if n not in formats]
    if unknown or not names:
        raise SchemeError(f"unknown format {unknown or '(empty)'}; formats: {', '.join(formats)} "
                          f"(comma-separated, e.g. format={','.join(formats)})")
    return [formats[n] for n in names]


def refuse_unwritable(target: Target, scheme: QuantScheme, formats: Sequence[ServingFormat]) -> None:
    """Refuse a scheme one of the chosen formats cannot hold, naming the presets it does hold."""
    for fmt in formats:
        reason = fmt.unsupported_reason(scheme)
        if reason is not None:
            from qcompiler.schemes import PRESETS

            fits = [n for n, s in PRESETS.items() if target.unsupported_reason(s) is None
                    and fmt.unsupported_reason(s) is None]
            raise SchemeError(f"target '{target.name}': format '{fmt.name}' cannot hold {scheme.describe()}: "
                              f"{reason}. It holds: {', '.join(fits) or 'none of the presets'}")
