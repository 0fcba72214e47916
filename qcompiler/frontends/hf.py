"""Hugging Face checkpoint frontend: lazy weights, a weightless model skeleton, per-block FX graphs.

A model is never materialised whole. The skeleton is built with parameters on the meta device (buffers such
as RoPE frequencies are real); embeddings, final norm and head are loaded from the safetensors; each decoder
block is traced with `torch.export.export(..., strict=False)` on meta tensors (no weights needed) and only
then filled with its own tensors, read lazily from the (possibly sharded) safetensors files.

Block inputs are captured by running the model's own prologue up to the first block (a forward pre-hook
that stops the run), so RoPE, embedding scaling (Gemma) and masks come from the model's code, not from
per-architecture tables.
"""

from __future__ import annotations

import copy
import hashlib
import inspect
import math
import re
from collections.abc import Callable, Iterable, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.utils._pytree as pytree
from safetensors import safe_open
from torch import fx
from torch.export import Dim

from qcompiler.errors import ModelLoadError, TraceError
from qcompiler.files import read_json, relative_file_name
from qcompiler.frontends.conversions import CONVERTED, find_conversion
from qcompiler.frontends.moe import unfuse_experts
from qcompiler.frontends.multimodal import (
    auto_model_class,
    is_multimodal,
    language_model_path,
    view_under_module_names,
)
from qcompiler.frontends.recurrent import recurrence_functions, recurrences_as_ops
from qcompiler.ir.graph import ADAPTER_PREFIX, aten, copy_graph, get_tensor, is_code_constant, set_tensor

# config.json sizes that are dimensions of some weight (at most the checkpoint's element count) and layer counts
# (at most its tensor count): a config claiming more describes another model, and building that model's skeleton
# would allocate without bound before any check of the weights could refuse it
_DIMENSION_KEYS = ("hidden_size", "intermediate_size", "moe_intermediate_size", "shared_expert_intermediate_size",
                   "head_dim", "vocab_size", "num_attention_heads", "num_key_value_heads", "num_experts",
                   "num_local_experts", "n_routed_experts", "kv_lora_rank", "q_lora_rank", "qk_rope_head_dim",
                   "qk_nope_head_dim", "v_head_dim", "n_embd", "n_inner", "n_head", "d_model", "ffn_dim")
_LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")

# safetensors dtypes a weight may have on disk (integer or fp8 tensors are a quantized checkpoint, not a float one)
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")
DEQUANTIZED_ON_READ = ("mxfp4",)  # pre-quantized layouts read as float (gpt-oss's experts: frontends/moe.py)
_TORCH_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                 "U8": torch.uint8, "I8": torch.int8, "I32": torch.int32, "I64": torch.int64}
_FINITE_CHECK_ELEMENTS = 1 << 24  # the NaN/Inf check reads a tensor in pieces of this many elements


class Checkpoint:
    """A folder with config.json and safetensors weights (one file or an index of shards), read lazily.

    Nothing in the folder is trusted: config.json and the index must be JSON objects, every file the index
    names must lie inside the folder, every weight file's header is read (and so validated) before any work,
    and every tensor is checked for NaN/Inf as it is read. `trust_remote_code` lets transformers import the
    folder's own Python (config.json `auto_map`); without it such a folder is refused by name."""

    def __init__(self, path: str | Path, trust_remote_code: bool = False):
        self.path = Path(path)
        self.trust_remote_code = trust_remote_code
        if not self.path.is_dir():
            raise ModelLoadError(f"model folder '{self.path}' does not exist (pass a Hugging Face checkpoint folder or 'demo')")
        if not (self.path / "config.json").is_file():
            raise ModelLoadError(f"'{self.path}' has no config.json; is it a Hugging Face checkpoint folder?")
        self.config_dict: dict[str, Any] = read_json(self.path / "config.json", "the model's config", ModelLoadError)
        if str(self.config_dict.get("model_type")) not in CONVERTED:  # (a converted layout needs no code)
            self._check_remote_code()
        index = self.path / "model.safetensors.index.json"
        self.weight_map: dict[str, str] = {}
        if index.is_file():
            weight_map = read_json(index, "the weight index", ModelLoadError).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise ModelLoadError(f"'{index}' has no 'weight_map' object naming tensors and their files")
            for name, file in weight_map.items():
                self.weight_map[name] = relative_file_name(file, f"'{index}': tensor '{name}'", ModelLoadError)
        else:
            files = sorted(f.name for f in self.path.glob("*.safetensors"))
            if not files:
                raise ModelLoadError(
                    f"'{self.path}' has no *.safetensors weights; convert .bin/.gguf weights to safetensors first"
                )
            for f in files:
                for k in self._header(f):
                    self.weight_map[k] = f
        missing = {f for f in set(self.weight_map.values()) if not (self.path / f).is_file()}
        if missing:
            raise ModelLoadError(f"'{self.path}': shard(s) {sorted(missing)} named by the index are missing")
        # dtype and shape of every tensor, from the headers (validated by safetensors: lengths, offsets, bounds)
        self.headers: dict[str, tuple[str, tuple[int, ...]]] = {}
        for f in sorted(set(self.weight_map.values())):
            held = self._header(f)
            for name, file in self.weight_map.items():
                if file == f and name not in held:
                    raise ModelLoadError(f"'{index}' places tensor '{name}' in '{f}', which does not hold it; "
                                         "restore the index or the shard from the checkpoint's source")
            self.headers.update({k: v for k, v in held.items() if self.weight_map.get(k) == f})
        # families that ship their own modeling code, read as the native architecture they are (frontends/conversions.py)
        self._files = dict(self.weight_map)  # stored tensor -> file
        self._stored_headers = dict(self.headers)
        self._views: dict[str, tuple[tuple[str, ...], Callable[..., torch.Tensor]]] = {}
        self.conversion = find_conversion(self.config_dict, set(self.headers), f"'{self.path}'")
        if self.conversion is not None:
            self.config_dict = self.conversion.config
            self.weight_map, self.headers = {}, {}
            self.add_views(self.conversion.tensors, replace=list(self._files))
        self._check_config_sizes(self.config_dict)
        self._handles: dict[str, Any] = {}
        self._loaded: dict[str, torch.Tensor] | None = None

    def _check_remote_code(self) -> None:
        """A config.json whose `auto_map` names Python files in the folder asks to run them; transformers asks
        on a terminal (and runs them on "y"). Refuse unless the user passed --trust-remote-code, except where
        transformers has its own class for the model type (it then ignores the folder's code)."""
        auto_map = self.config_dict.get("auto_map")
        if not auto_map or self.trust_remote_code:
            return
        from transformers import CONFIG_MAPPING

        if str(self.config_dict.get("model_type")) in CONFIG_MAPPING:
            return
        names = ", ".join(sorted(str(v) for v in (auto_map.values() if isinstance(auto_map, dict) else [auto_map])))
        raise ModelLoadError(
            f"'{self.path / 'config.json'}' needs the folder's own Python code ({names}) for model type "
            f"'{self.config_dict.get('model_type')}'; qcompile never runs code from a model folder unless you pass "
            "--trust-remote-code (read that code first)"
        )

    def _check_config_sizes(self, config: dict[str, Any], where: str = "") -> None:
        """Refuse config.json sizes no weight of this checkpoint can have (nested configs too: text_config, ...)."""
        elements = sum(math.prod(shape) for _, shape in self.headers.values())
        for key, value in config.items():
            if isinstance(value, dict):
                self._check_config_sizes(value, f"{where}{key}.")
            elif isinstance(value, int) and not isinstance(value, bool):
                limit = len(self.headers) if key in _LAYER_KEYS else elements if key in _DIMENSION_KEYS else None
                if limit is not None and not 0 <= value <= limit:
                    raise ModelLoadError(
                        f"'{self.path / 'config.json'}': {where}{key} = {value} cannot describe these weights "
                        f"({len(self.headers)} tensors, {elements} values); config.json belongs to another model"
                    )

    def _header(self, file: str) -> dict[str, tuple[str, tuple[int, ...]]]:
        path = self.path / file
        try:
            with safe_open(str(path), framework="pt") as h:
                return {k: (h.get_slice(k).get_dtype(), tuple(h.get_slice(k).get_shape()))
                        for k in h.keys()}  # noqa: SIM118 (safe_open is not a mapping)
        except Exception as e:  # SafetensorError, OSError, ...: safetensors raises several types here
            detail = " ".join(str(e).split())[:200]
            raise ModelLoadError(f"'{path}' is not a readable safetensors file ({detail}); re-download or "
                                 "re-convert it") from None

    def check_tensors(self, model: torch.nn.Module) -> None:
        """Refuse, before any work, a checkpoint that does not hold exactly the weights of `model` (a skeleton
        with meta parameters under checkpoint names): missing tensors, shapes or dtypes that disagree with
        config.json, and tensors the model would silently not use (e.g. config.json lists fewer layers)."""
        state = model.state_dict(keep_vars=True)
        params = dict(model.named_parameters(remove_duplicate=False))
        tied = getattr(model, "all_tied_weights_keys", None) or {}  # tied weight -> the weight it shares
        where = f"'{self.path}'"
        missing = [n for n in params if n not in self.headers and tied.get(n) not in self.headers]
        if missing:
            raise ModelLoadError(f"{where}: tensor(s) {_listed(missing)} of this {model.config.model_type} model are "
                                 "missing from the checkpoint; restore the missing shard or fix config.json")
        for name, value in state.items():
            if name not in self.headers:
                continue
            dtype, shape = self.headers[name]
            if tuple(value.shape) != shape:
                raise ModelLoadError(f"{where}: tensor '{name}' has shape {list(shape)} but config.json makes it "
                                     f"{list(value.shape)}; the config and the weights belong to different models")
            if name in params and dtype not in FLOAT_DTYPES:
                raise ModelLoadError(f"{where}: weight '{name}' is stored as {dtype}; qcompile quantizes float "
                                     "checkpoints (F32, F16, BF16), dequantize or re-export it first")
        ignored = [re.compile(p) for p in (getattr(model, "_keys_to_ignore_on_load_unexpected", None) or ())]
        unused = sorted(n for n in self.headers if n not in state and not any(p.search(n) for p in ignored)
                        and not n.endswith("rotary_emb.inv_freq"))
        if unused:
            raise ModelLoadError(f"{where}: {len(unused)} tensor(s) the model described by config.json does not use, "
                                 f"e.g. {_listed(unused)}; config.json does not match the weights (a layer count or "
                                 "an architecture field is wrong)")

    def fingerprint(self) -> str:
        """Identity of the checkpoint's contents: config and index bytes, and each weight file's name, size
        and modification time (hashing hundreds of GB of weights would cost more than a block)."""
        h = hashlib.sha256()
        for name in ("config.json", "model.safetensors.index.json"):
            if (self.path / name).is_file():
                h.update((self.path / name).read_bytes())
        for f in sorted(set(self.weight_map.values())):
            st = (self.path / f).stat()
            h.update(f"{f}|{st.st_size}|{st.st_mtime_ns}".encode())
        return h.hexdigest()

    def load_all(self) -> None:
        """Read every tensor into memory now (no streaming: the way a whole-model loader works; used to
        compare against streaming, whose result must be identical)."""
        self._loaded = {}
        by_file: dict[str, list[str]] = {}
        for name, file in self.weight_map.items():
            by_file.setdefault(file, []).append(name)
        for names in by_file.values():  # one file's map at a time: its pages leave RSS before the next
            for name in names:
                self._loaded[name] = self._read(name).clone()
            self._handles.clear()

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def tensor(self, name: str) -> torch.Tensor:
        if name not in self.weight_map:
            raise ModelLoadError(f"tensor '{name}' is not in the checkpoint '{self.path}'")
        if self._loaded is not None:
            return self._loaded[name]
        return self._read(name)

    def add_views(self, views: dict[str, tuple[tuple[str, ...], Callable[..., torch.Tensor]]],
                  replace: list[str], dtype: str | None = None) -> None:
        """Serve tensors computed from stored ones (name -> (stored names, function of them)) in place of the
        stored tensors `replace` (a converted layout, experts stacked in one stored tensor). `dtype`: the served
        tensors' safetensors dtype where it is not their first source's (dequantized MXFP4 blocks)."""
        for name in replace:
            self.weight_map.pop(name, None)
            self.headers.pop(name, None)
        for name, (sources, fn) in views.items():
            metas = (torch.empty(self._stored_headers[s][1], device="meta",
                                 dtype=_TORCH_DTYPES.get(self._stored_headers[s][0], torch.float32)) for s in sources)
            self.weight_map[name] = self._files[sources[0]]
            self.headers[name] = (dtype or self._stored_headers[sources[0]][0], tuple(fn(*metas).shape))
            self._views[name] = (sources, fn)

    def _read(self, name: str) -> torch.Tensor:
        if name in self._views:
            sources, convert = self._views[name]
            return convert(*(self._read_stored(s) for s in sources)).contiguous()
        return self._read_stored(name)

    def _read_stored(self, name: str) -> torch.Tensor:
        file = self._files[name]
        if file not in self._handles:
            self._handles[file] = safe_open(str(self.path / file), framework="pt")
        t = self._handles[file].get_tensor(name)
        if t.is_floating_point() and not _all_finite(t):
            raise ModelLoadError(f"'{self.path / file}': tensor '{name}' holds NaN or Inf values; the checkpoint is "
                                 "damaged (re-download or re-convert it)")
        return t

    def release(self) -> None:
        """Close the memory maps. Tensors already read stay valid (they keep their own mapping alive);
        pages of blocks that are finished then leave this process's RSS instead of piling up block after
        block (they are file-backed: reclaimable, but counted in RSS and peak RSS)."""
        self._handles.clear()

    def config(self) -> Any:
        from transformers import AutoConfig

        try:
            if self.conversion is not None:
                fields = {k: v for k, v in self.conversion.config.items() if k != "model_type"}
                return AutoConfig.for_model(self.conversion.config["model_type"], **fields)
            config = AutoConfig.from_pretrained(str(self.path), trust_remote_code=self.trust_remote_code)
        except Exception as e:  # transformers raises ValueError, KeyError, TypeError, OSError... on a bad config
            raise ModelLoadError(f"'{self.path}/config.json': {' '.join(str(e).split())[:300]}") from None
        stated = getattr(config, "quantization_config", None)
        method = stated.get("quant_method") if isinstance(stated, dict) else getattr(stated, "quant_method", None)
        if method is not None and str(getattr(method, "value", method)) not in DEQUANTIZED_ON_READ:
            raise ModelLoadError(f"'{self.path}/config.json': this checkpoint is already quantized (quantization_config "
                                 f"quant_method '{getattr(method, 'value', method)}'); qcompile quantizes float "
                                 f"checkpoints ({', '.join(DEQUANTIZED_ON_READ)} experts are dequantized on read): "
                                 "point --model at the float original")
        return config


def _all_finite(t: torch.Tensor) -> bool:
    flat = t.reshape(-1)
    wide = t.element_size() == 1  # (fp8: torch has no isfinite for it; its values are exact in float32)
    return all(bool(torch.isfinite(c.float() if wide else c).all())
               for c in flat.split(_FINITE_CHECK_ELEMENTS))


def _listed(names: list[str], n: int = 5) -> str:
    shown = ", ".join(f"'{x}'" for x in names[:n])
    return shown + (f" and {len(names) - n} more" if len(names) > n else "")


ATTENTION = "qcompiler_sdpa"
RENAMED_ON_LOADING = ("hy_v4",)


def attention_implementation(config: Any) -> str:
    """transformers' SDPA attention with masks that are always built: "sdpa" skips the mask when a window of the
    sequence is causal anyway (a probe shorter than a sliding window), and a block traced without its mask would
    run without it on longer sequences (silently wrong after the window). Registered once, on first use.
    Architectures whose attention SDPA cannot express (Gemma 2's logit soft-capping, gpt-oss's sinks) run their
    own eager attention, whose masks are always built too."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    model_class = MODEL_FOR_CAUSAL_LM_MAPPING.get(type(config), None)
    if model_class is not None and not (getattr(model_class, "_supports_sdpa", True)
                                        and getattr(model_class, "_supports_attention_backend", True)):
        return "eager"  # (also models that pick their attention class by name, e.g. Falcon: only the built-in names)
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import sdpa_mask

    if ATTENTION not in AttentionMaskInterface._global_mapping:
        def always_built_mask(*args: Any, **kwargs: Any) -> Any:
            kwargs["allow_is_causal_skip"] = False
            return sdpa_mask(*args, **kwargs)

        AttentionInterface.register(ATTENTION, sdpa_attention_forward)
        AttentionMaskInterface.register(ATTENTION, always_built_mask)
    return ATTENTION


def build_skeleton(ckpt: Checkpoint, dtype: torch.dtype = torch.float32, check: bool = True,
                   before_weights: Callable[[torch.nn.Module], None] | None = None) -> torch.nn.Module:
    """The causal-LM module with meta parameters; non-block weights (embeddings, norms, head) loaded. With
    `check`, the checkpoint's tensors are checked against the model first (Checkpoint.check_tensors); our own
    artefacts, which hold quantized tensors under other names, are checked by their manifest instead.
    `before_weights(model)` runs just before the outer weights are read (an artefact's quantized vision linears
    replace the float ones there)."""
    from accelerate import init_empty_weights
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    config = ckpt.config()
    multimodal = is_multimodal(config)
    remote = ckpt.trust_remote_code and "AutoModelForCausalLM" in (getattr(config, "auto_map", None) or {})
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and not multimodal and not remote:
        raise ModelLoadError(
            f"'{ckpt.path}/config.json': architecture '{config.model_type}' is neither a causal language model nor "
            "a vision-language model that transformers knows; supported families include llama, qwen2, qwen3, "
            "mistral, gemma, qwen2_vl, llava"
        )
    config.use_cache = False
    text = config.get_text_config()
    text.use_cache = False
    auto = auto_model_class(config)
    try:
        with init_empty_weights(include_buffers=False):
            model = auto.from_config(config, attn_implementation=attention_implementation(config), dtype=dtype,
                                     trust_remote_code=ckpt.trust_remote_code)
    except Exception as e:  # noqa: BLE001 (the model's own constructor checks its config with any exception type)
        # a config whose fields contradict each other (hidden_size not divisible by the heads, a padding index
        # outside the vocabulary) or are absurd (a size that cannot be allocated even for the one moment each
        # weight exists before it becomes meta)
        raise ModelLoadError(f"'{ckpt.path}/config.json' describes no buildable {config.model_type} model: "
                             f"{' '.join(str(e).split())[:300]}") from None
    linear = sorted({t for t in getattr(text, "layer_types", None) or () if "linear" in str(t)})
    if linear and not recurrence_functions(model):
        # (a recurrence chunked by the sequence length cannot be traced symbolically; frontends/recurrent.py
        # keeps the ones it knows as single ops)
        raise ModelLoadError(f"'{ckpt.path}/config.json': {config.model_type} has linear-attention layers "
                             f"({', '.join(linear)}) whose recurrence qcompiler does not trace yet (it traces "
                             "Qwen3-Next's Gated DeltaNet and MiniMax's lightning attention)")
    # (older VLM checkpoints name the language model and vision tower as transformers 4 did; HunYuan v4's keep
    # their own names, which transformers renames on loading)
    if multimodal or config.model_type in RENAMED_ON_LOADING:
        view_under_module_names(model, ckpt)
    model.eval()
    prefix, _ = find_blocks(model)
    unfuse_experts(model, ckpt, prefix)
    if check:
        ckpt.check_tensors(model)
    for name, buf in list(model.named_buffers()):
        # a block buffer the checkpoint holds (DeepSeek-V3's router score bias) is filled per block like the
        # weights; it must be meta for tracing (buffers such as RoPE tables stay real)
        if name.startswith(prefix + ".") and name in ckpt and not buf.is_meta:
            *path, leaf = name.split(".")
            model.get_submodule(".".join(path))._buffers[leaf] = buf.to("meta")
    if before_weights is not None:
        before_weights(model)
    load_outer_weights(model, ckpt, dtype)
    return model


def load_outer_weights(model: torch.nn.Module, ckpt: Checkpoint, dtype: torch.dtype = torch.float32) -> None:
    """Give the weights outside the decoder blocks (embeddings, final norm, head) their values."""
    prefix, _ = find_blocks(model)
    for name, _ in list(model.named_parameters(remove_duplicate=False)):
        if not name.startswith(prefix + ".") and name in ckpt:
            _assign(model, name, ckpt.tensor(name).to(dtype))
    model.tie_weights()
    for name, param in model.named_parameters():
        if not name.startswith(prefix + ".") and param.is_meta:
            raise ModelLoadError(f"'{ckpt.path}': weight '{name}' is missing from the checkpoint")


def drop_outer_weights(model: torch.nn.Module) -> None:
    """Make the weights outside the blocks meta again (`load_outer_weights` restores them): while blocks are
    quantized nothing reads them, and a large vocabulary's embedding and head in float32 are the biggest
    fixed cost of a run (DeepSeek-V3: 7.4 GB)."""
    prefix, _ = find_blocks(model)
    for name, param in list(model.named_parameters(remove_duplicate=False)):
        if not name.startswith(prefix + "."):
            _assign(model, name, torch.empty_like(param, device="meta"))


def _assign(module: torch.nn.Module, name: str, value: torch.Tensor) -> None:
    *path, leaf = name.split(".")
    mod = module
    for p in path:
        mod = getattr(mod, p)
    mod._parameters[leaf] = torch.nn.Parameter(value, requires_grad=False)


def find_blocks(model: torch.nn.Module) -> tuple[str, torch.nn.ModuleList]:
    """The decoder blocks: the ModuleList holding the most parameters (found structurally, not by name), inside
    the language model of a vision-language model."""
    best: tuple[int, str, torch.nn.ModuleList] | None = None
    language = language_model_path(model)
    for name, mod in model.named_modules():
        if language and not name.startswith(language + "."):
            continue
        if isinstance(mod, torch.nn.ModuleList) and len(mod) > 0:
            size = sum(p.numel() for p in mod.parameters())
            if best is None or size > best[0]:
                best = (size, name, mod)
    if best is None:
        raise ModelLoadError(f"{model.__class__.__name__}: no list of decoder blocks found")
    return best[1], best[2]


# ------------------------------------------------------------------------------------------ block inputs


@dataclass
class BlockCall:
    """How the model calls a block: flat tensor kwargs (by key order) and the constants that go with them."""

    keys: tuple[str, ...]
    spec: pytree.TreeSpec
    nones: tuple[str, ...] = ()  # arguments the model passes as None (a required one, e.g. Falcon's alibi, too)
    # single-tensor keywords the traced graph reads only in its input guards, with their probe shape and dtype: a
    # model may pass them as None on another path (Qwen3-VL's position_ids with an image), and a stand-in of the
    # guarded shape then takes their place (BlockTracer fills this in)
    unread: dict[str, tuple[tuple[int, ...], torch.dtype]] = field(default_factory=dict)
    # the model indexes its blocks' results (Falcon): a compiled block must return a tuple of the hidden states
    tuple_output: bool = False
    # the model unpacks more than the hidden states (GLM-5: (hidden, top-k indices) handed to the next layer, which
    # reads them only on a "shared" indexer layer): a compiled block returns that many Nones after them
    trailing_nones: int = 0
    # empty mutable mappings the model hands every block to write into (Gemma 4's shared_kv_states, read only by
    # layers that reuse an earlier layer's K/V, which are refused): each call gets a fresh one of that type
    scratch: dict[str, type] = field(default_factory=dict)


class _Stop(Exception):
    pass


@dataclass
class BlockInputs:
    """How a model calls each of its blocks, captured from its own prologue on some batches of input ids.

    Blocks may be called differently: a hybrid model gives its sliding and full attention layers different masks
    (Gemma 2/3, gpt-oss, EXAONE 4) and its linear-attention layers none (Qwen3-Next). Every block therefore has
    its own call and its own keyword tensors per batch; blocks called alike share the objects."""

    calls: list[BlockCall]  # per block
    hidden: list[torch.Tensor]  # per batch: the first block's hidden states
    kwargs: list[list[tuple[torch.Tensor, ...]]]  # per block, per batch: the flat keyword tensors

    def of_block(self, i: int) -> list[tuple[torch.Tensor, ...]]:
        """Block i's flat inputs per batch, with the first block's hidden states."""
        return [(h, *kw) for h, kw in zip(self.hidden, self.kwargs[i], strict=True)]


def capture_block_inputs(model: torch.nn.Module,
                         batches: Iterable[torch.Tensor] | Iterable[dict[str, torch.Tensor]]) -> BlockInputs:
    """Run the model on each batch of input ids with every block stood in for by a pass-through that records
    its arguments (so nothing but the prologue computes), stopping at the last block."""
    _, blocks = find_blocks(model)
    batches = list(batches)
    if not batches:
        raise ModelLoadError("no calibration batches: cannot capture block inputs")
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    if "reuse" in (getattr(config, "kv_sharing_modes", None) or ()):
        # (such a layer attends to keys and values another block computed: a dependency between blocks' graphs)
        raise ModelLoadError(f"{model.__class__.__name__}: its last {config.num_kv_shared_layers} layers reuse earlier "
                             "layers' keys and values (num_kv_shared_layers), which qcompiler does not trace: this "
                             "model is not supported")
    # (a model that indexes its blocks' tuple results needs one back; one that unpacks two values, a pair)
    for returns_tuple, trailing_nones in ((False, 0), (True, 0), (True, 1)):
        try:
            captured = _run_with_recording_blocks(model, blocks, batches, returns_tuple, trailing_nones)
            break
        except Exception as e:  # noqa: BLE001 (the model's code after a stand-in block fails as it may)
            failure = e
    else:
        raise ModelLoadError(f"{model.__class__.__name__}: its blocks' inputs cannot be captured "
                             f"({' '.join(str(failure).split())[:200]})")
    calls: dict[tuple, BlockCall] = {}  # (blocks called alike share one)
    block_calls, flat_kwargs = [], []
    for per_batch in captured:  # per block
        tensors = [{k: v for k, v in sorted(kwargs.items()) if _is_tensor_tree(v)} for _, kwargs in per_batch]
        spec = pytree.tree_structure(tensors[0])
        nones = tuple(k for k, v in sorted(per_batch[0][1].items()) if v is None)
        scratch = {k: type(v) for k, v in sorted(per_batch[0][1].items())
                   if isinstance(v, MutableMapping) and not v}
        call = calls.setdefault((tuple(tensors[0]), str(spec), nones, tuple(scratch)),
                                BlockCall(keys=tuple(tensors[0]), spec=spec, nones=nones, tuple_output=returns_tuple,
                                          trailing_nones=trailing_nones, scratch=scratch))
        block_calls.append(call)
        flat_kwargs.append([tuple(pytree.tree_leaves(kw)) for kw in tensors])
    return BlockInputs(block_calls, [hidden for hidden, _ in captured[0]], flat_kwargs)


def _run_with_recording_blocks(model: torch.nn.Module, blocks: torch.nn.ModuleList,
                               batches: list[torch.Tensor] | list[dict[str, torch.Tensor]],
                               returns_tuple: bool, trailing_nones: int = 0) -> list[list[tuple[torch.Tensor, dict]]]:
    """Per block, per batch: (hidden states, keyword arguments) of its call."""
    captured: list[list[tuple[torch.Tensor, dict]]] = [[] for _ in blocks]

    def stand_in(i: int) -> Callable[..., Any]:
        def forward(*args: Any, **kwargs: Any) -> Any:
            hidden, named = block_arguments(blocks[i], args, kwargs)
            if i and hidden.shape != captured[0][-1][0].shape:
                raise ValueError(f"block {i} got hidden states {list(hidden.shape)} from the stand-in of block "
                                 f"{i - 1}, which received {list(captured[0][-1][0].shape)}")
            captured[i].append((hidden, named))
            if i == len(blocks) - 1:
                raise _Stop
            return (hidden, *[None] * trailing_nones) if returns_tuple else hidden
        return forward

    try:
        for i, block in enumerate(blocks):
            block.forward = stand_in(i)  # (an instance attribute: nn.Module.__call__ runs it)
        with torch.no_grad():
            for batch in batches:  # (input ids, or a VLM's keyword inputs: ids, pixels, image grids, ...)
                try:
                    model(**(batch if isinstance(batch, dict) else {"input_ids": batch}), use_cache=False)
                except _Stop:
                    pass
    finally:
        for block in blocks:
            block.__dict__.pop("forward", None)
    return captured


# The example a block is traced with: batch ≠ seq and neither likely to equal a model dimension, so both dims
# are told apart and stay dynamic in the exported graph.
PROBE_SHAPE = (2, 17)


def probe_block_inputs(model: torch.nn.Module) -> BlockInputs:
    """How `model` calls its blocks, and one example of each block's inputs to trace with (`of_block(i)[0]`)."""
    return capture_block_inputs(model, [torch.zeros(PROBE_SHAPE, dtype=torch.long)])


def _is_tensor_tree(v: object) -> bool:
    if v is None:
        return False
    leaves = pytree.tree_leaves(v)
    return bool(leaves) and all(isinstance(x, torch.Tensor) for x in leaves)


def block_arguments(block: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[torch.Tensor, dict]:
    """(hidden states, every other argument by name) of a call of `block`: a model may pass some inputs by
    position (Falcon passes `alibi` second), and positions mean nothing to a traced graph's keyword inputs."""
    if len(args) <= 1:
        hidden = args[0] if args else kwargs.pop("hidden_states")
        return hidden, dict(kwargs)
    # (the class's forward: while inputs are captured, the instance's forward is a stand-in taking *args)
    names = [p for p in inspect.signature(type(block).forward).parameters if p not in ("self", "args", "kwargs")]
    if len(args) > len(names):  # (never drop an input: the block would be traced and run without it)
        raise ModelLoadError(f"{type(block).__name__} is called with {len(args)} positional inputs, more than its "
                             f"forward names ({names})")
    named = dict(zip(names[1:], args[1:], strict=False))
    return args[0], {**named, **kwargs}


def flatten_block_kwargs(call: BlockCall, kwargs: dict, hidden: torch.Tensor | None = None) -> list[torch.Tensor]:
    """The block's flat tensor inputs from the keywords the model calls it with. A tensor keyword the block was
    traced without (a mask or table the probe did not produce) is refused, never dropped: dropping it would run
    the block without it (e.g. a sliding window's mask) and silently compute something else. A keyword the graph
    never reads (BlockCall.unread) that comes as None gets a zero stand-in of the shape its guard checks (the probe's
    batch and sequence sizes replaced by `hidden`'s)."""
    if hidden is not None:
        kwargs = dict(kwargs)
        for k, (shape, dtype) in call.unread.items():
            if kwargs.get(k) is None:
                sizes = {PROBE_SHAPE[0]: hidden.shape[0], PROBE_SHAPE[1]: hidden.shape[1]}
                kwargs[k] = torch.zeros([sizes.get(d, d) for d in shape], dtype=dtype, device=hidden.device)
    unseen = sorted(k for k, v in kwargs.items() if k not in call.keys and _is_tensor_tree(v))
    if unseen:
        raise ModelLoadError(f"the model called a block with tensor inputs {unseen} that the block was traced without "
                             f"(it takes {list(call.keys)}); quantizing this model needs those inputs at trace time")
    kw = {k: kwargs.get(k) for k in call.keys}
    flat, spec = pytree.tree_flatten(kw)
    if spec != call.spec:
        raise ModelLoadError(
            f"the model called a block with inputs {sorted(k for k, v in kwargs.items() if v is not None)} "
            f"but the block was compiled for {list(call.keys)} (padding masks are not supported: "
            "evaluate unpadded windows)"
        )
    return flat


# ------------------------------------------------------------------------------------------ tracing


class BlockAdapter(torch.nn.Module):
    """Gives a decoder block a flat, tensors-only signature so its exported graph has plain placeholders."""

    def __init__(self, block: torch.nn.Module, call: BlockCall):
        super().__init__()
        self.block = block
        self._call = call

    def forward(self, hidden: torch.Tensor, *flat: torch.Tensor) -> torch.Tensor:
        kwargs = pytree.tree_unflatten(list(flat), self._call.spec)
        scratch = {k: kind() for k, kind in self._call.scratch.items()}
        out = self.block(hidden, **dict.fromkeys(self._call.nones), **scratch, **kwargs, use_cache=False)
        return out[0] if isinstance(out, tuple) else out


def longest_traced_sequence(block: torch.nn.Module) -> int | None:
    """The sequence length a block's graph is valid up to, None for any. A sparse-attention indexer (DeepSeek V3.2's
    DSA) attends to the top min(index_topk, S) keys its scores select: up to index_topk tokens that is every key,
    i.e. causal attention, and that is the function traced (export cannot keep min(k, S) symbolic across both
    regimes: it specializes to S ≤ index_topk). Callers refuse longer inputs (HFRun.prologue, CompiledBlock) rather
    than compute the dense regime where the model is sparse."""
    bounds = [int(m.index_topk) for m in block.modules() if isinstance(getattr(m, "index_topk", None), int)]
    return min(bounds) if bounds else None


def _dynamic_shapes(example: tuple[torch.Tensor, ...], seq_max: int | None = None) -> tuple:
    batch, seq = example[0].shape[0], example[0].shape[1]
    # (a bounded block: Dim.AUTO lets export assume S ≤ seq_max where a named range cannot prove min(k, S) = S)
    b, s = Dim("batch", min=1), (Dim("seq", min=2) if seq_max is None else Dim.AUTO)

    def dims(t: torch.Tensor) -> dict[int, Dim]:
        d: dict[int, Dim] = {}
        for i, size in enumerate(t.shape):
            if size == seq:
                d[i] = s
            elif size == batch and i == 0:
                d[i] = b
        return d

    return (dims(example[0]), tuple(dims(t) for t in example[1:]))


def _export(block: torch.nn.Module, call: BlockCall, example: tuple[torch.Tensor, ...], name: str) -> fx.GraphModule:
    """torch.export of the block behind its flat adapter, dynamic in batch and sequence, its linear-attention
    recurrences as single ops (frontends/recurrent.py)."""
    adapter = BlockAdapter(block, call).eval()
    dynamic = _dynamic_shapes(example, longest_traced_sequence(block))
    try:
        with recurrences_as_ops(block):
            gm = torch.export.export(adapter, example, dynamic_shapes=dynamic, strict=False).module()
            if any(n.op == "get_attr" and isinstance(getattr(gm, str(n.target), None), fx.GraphModule)
                   for n in gm.graph.nodes):
                # a `with torch.no_grad()` inside the block (Phi-3.5-MoE's sparsemixer) is exported as a region
                # submodule; with grad already off it changes nothing and the graph stays flat
                with torch.no_grad():
                    gm = torch.export.export(adapter, example, dynamic_shapes=dynamic, strict=False).module()
    except Exception as e:  # torch raises many types here; report the op it names
        raise TraceError(name, _failing_op(e), str(e).strip().splitlines()[0][:300]) from e
    return gm


def trace_block(
    block: torch.nn.Module, call: BlockCall, example: tuple[torch.Tensor, ...], name: str
) -> fx.GraphModule:
    """Export one block to an ATen FX GraphModule. The example is traced on the meta device, so the block's
    parameters must be meta too (as the skeleton's are); `fill_block` gives the graph its real tensors.

    The example must have batch ≠ seq and seq > 2 so that the two dims are told apart and kept dynamic.
    """
    if "alibi" in call.keys:
        # (the bias is [batch · heads, 1, seq]: one dimension holding two sizes, which the exported graph's dynamic
        # batch cannot take)
        raise ModelLoadError(f"block '{name}' takes ALiBi position biases (BLOOM, MPT, Falcon with alibi=true), which "
                             "merge batch and heads in one dimension; qcompiler traces rotary or no-position "
                             "attention only: this model is not supported")
    gm = _export(block, call, tuple(t.to("meta") for t in example), name)
    if _meta_constants(gm):
        # The block's code built a tensor constant while it ran (Falcon's multi-query split indexes with the
        # Python list [-2]); on meta its value is lost. Trace once more on an uninitialised CPU copy of the
        # block: the export then keeps the constant's value, and the weights' (garbage) values are never read.
        cpu_block = copy.deepcopy(block).to_empty(device="cpu")
        gm = _export(cpu_block, call, tuple(torch.zeros(t.shape, dtype=t.dtype) for t in example), name)
        for target in dict.fromkeys(str(n.target) for n in gm.graph.nodes if n.op == "get_attr"):
            if not is_code_constant(target):
                set_tensor(gm, target, get_tensor(gm, target).to("meta"))  # the copy's garbage weights go
        _unpin_trace_device(gm, "cpu")
    _strip_export_asserts(gm)
    _unpin_trace_device(gm, "meta")
    _linears_from_matmuls(gm)
    return gm


# ops that are W.T for a 2-D W whatever their arguments (unlike analysis._TRANSPOSES, which also sees through
# permute / transpose.int of any rank)
_MATRIX_TRANSPOSES = (aten.numpy_T.default, aten.t.default)


def _linears_from_matmuls(gm: fx.GraphModule) -> None:
    """Write `x @ W.T (+ b)` as `aten.linear(x, W, b)` for a stored 2-D weight W [out, in] (Falcon's FalconLinear
    computes this way): the same product, now seen by every weight pass as the linear layer it is. The bias is
    folded in only where the sum is the product's one use and b is a stored [out] vector."""
    changed = False
    for n in list(gm.graph.nodes):
        if not (n.op == "call_function" and n.target is aten.matmul.default):
            continue
        x, wt = n.args
        if not (isinstance(wt, fx.Node) and wt.op == "call_function" and wt.target in _MATRIX_TRANSPOSES):
            continue
        w = wt.args[0]
        if not (isinstance(w, fx.Node) and w.op == "get_attr" and get_tensor(gm, str(w.target)).dim() == 2):
            continue
        out_features = get_tensor(gm, str(w.target)).shape[0]
        bias, replaced = None, n
        (user,) = n.users if len(n.users) == 1 else (None,)
        if user is not None and user.op == "call_function" and user.target is aten.add.Tensor and user.args[0] is n:
            b = user.args[1]
            if (isinstance(b, fx.Node) and b.op == "get_attr"
                    and tuple(get_tensor(gm, str(b.target)).shape) == (out_features,)):
                bias, replaced = b, user
        with gm.graph.inserting_before(replaced):
            linear = gm.graph.call_function(aten.linear.default, (x, w) if bias is None else (x, w, bias))
        linear.meta = dict(n.meta)
        replaced.replace_all_uses_with(linear)
        changed = True
    if changed:
        gm.graph.eliminate_dead_code()
        gm.recompile()


def _meta_constants(gm: fx.GraphModule) -> list[str]:
    """The tensor constants the export lifted out of the block's code whose values are meta (lost)."""
    targets = dict.fromkeys(str(n.target) for n in gm.graph.nodes
                            if n.op == "get_attr" and is_code_constant(str(n.target)))
    return [t for t in targets if get_tensor(gm, t).is_meta]


def _unpin_trace_device(gm: fx.GraphModule, device_type: str) -> None:
    """Tracing runs on meta (or, for blocks with constants, CPU) tensors, so an explicit `.to(device=x.device)`
    in the model's code (DeepSeek-V2's complex RoPE) is recorded with the trace's device: drop it, the op then
    keeps its input's device."""
    changed = False
    for n in gm.graph.nodes:
        dev = n.kwargs.get("device")
        if n.op == "call_function" and isinstance(dev, torch.device) and dev.type == device_type:
            n.kwargs = {k: v for k, v in n.kwargs.items() if k != "device"}
            changed = True
    if changed:
        gm.recompile()


_SCALARS = (int, float, str, bool, type(None))


def block_signature(block: torch.nn.Module) -> str:
    """Everything but weight values that decides a block's traced graph: module types, parameter and buffer
    shapes/dtypes, and the modules' scalar attributes (attention type, sliding window, head counts, ...).
    The layer index is left out: it only selects a KV-cache slot, and tracing runs without a cache."""
    parts: list[object] = []
    for name, mod in block.named_modules():
        attrs = sorted(
            (k, repr(v)) for k, v in vars(mod).items()
            if not k.startswith("_") and k not in ("layer_idx", "training")
            and (isinstance(v, _SCALARS) or (isinstance(v, tuple) and all(isinstance(x, _SCALARS) for x in v)))
        )
        parts.append((name, type(mod).__module__, type(mod).__qualname__, attrs))
    for name, t in list(block.named_parameters()) + list(block.named_buffers()):
        parts.append((name, tuple(t.shape), str(t.dtype)))
    return repr(parts)


class BlockTracer:
    """trace_block with a memo: blocks with equal signatures, called alike, share one export (a copy of the meta
    graph), so a 30-block model is exported once or a few times (one per distinct layer type), not 30 times."""

    def __init__(self, probe: BlockInputs):
        self.probe = probe
        self._graphs: dict[tuple[int, str], fx.GraphModule] = {}
        self.exports = 0

    def __call__(self, index: int, block: torch.nn.Module, name: str) -> fx.GraphModule:
        call, (example,) = self.probe.calls[index], self.probe.of_block(index)
        key = (id(call), block_signature(block))
        if key not in self._graphs:
            self._graphs[key] = trace_block(block, call, example, name)
            self.exports += 1
            _note_unread(self._graphs[key], call, example)
        return copy_graph(self._graphs[key])


def _note_unread(gm: fx.GraphModule, call: BlockCall, example: tuple[torch.Tensor, ...]) -> None:
    """Record the single-tensor keywords whose placeholder feeds nothing but the export's input guards."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"][1:]  # (after the hidden states)
    kwargs = pytree.tree_unflatten(list(range(len(example) - 1)), call.spec)
    for key, index in kwargs.items():
        if not isinstance(index, int) or index >= len(placeholders):
            continue
        users = placeholders[index].users
        if all(u.op == "call_module" and str(u.target).startswith("_guards") for u in users):
            call.unread.setdefault(key, (tuple(example[1 + index].shape), example[1 + index].dtype))


def _failing_op(e: Exception) -> str:
    text = str(e)
    for marker in ("aten.", "torch.ops.", "call_function", "Could not run '"):
        i = text.find(marker)
        if i >= 0:
            return text[i : i + 60].split()[0].strip("'\",()")
    return type(e).__name__


def _strip_export_asserts(gm: fx.GraphModule) -> None:
    """Drop dtype/shape assertion nodes (they pin float32 and block bf16 runs and rewrites)."""
    for n in list(gm.graph.nodes):
        if n.op == "call_function" and n.target in (
            aten._assert_tensor_metadata.default,
            aten._assert_scalar.default,
            aten.sym_constrain_range_for_size.default,
        ):
            gm.graph.erase_node(n)
    gm.graph.eliminate_dead_code()
    gm.recompile()


def fill_block(gm: fx.GraphModule, block_prefix: str, source: Any, block: torch.nn.Module, dtype: torch.dtype) -> None:
    """Give every get_attr of a traced block its real tensor: from `source` (a Checkpoint, by checkpoint
    name) or from the module's real buffers. Targets the graph reads but the module lacks are created."""
    real_buffers = {k: v for k, v in block.named_buffers() if not v.is_meta}
    targets = dict.fromkeys(str(n.target) for n in gm.graph.nodes if n.op == "get_attr")
    for target in targets:
        local = target.removeprefix(ADAPTER_PREFIX)
        full = f"{block_prefix}.{local}"
        if full in source:
            value = source.tensor(full)
            if value.is_floating_point() and _is_float_weight(local):
                value = value.to(dtype)
        elif local in real_buffers:
            value = real_buffers[local]
        else:
            try:
                current = get_tensor(gm, target)
            except AttributeError:
                current = None
            if current is not None and not current.is_meta:
                continue
            raise ModelLoadError(f"block '{block_prefix}': tensor '{full}' is not in '{getattr(source, 'path', source)}'")
        set_tensor(gm, target, value)


def keep_unread_weights(gm: fx.GraphModule, block_prefix: str, source: Any, block: torch.nn.Module,
                        quantized: set[str]) -> list[str]:
    """Stored tensors of the block that its lowered graph does not read — DeepSeek V3.2's indexer, whose scores
    select every key up to index_topk tokens, so the trace drops it — become unused graph attributes (float, as
    stored), so the artefact and every export hold each weight the serving engines load. `quantized`: the module
    paths (checkpoint names) of the block's quantized layers, whose float weights are replaced by their codes.
    Returns the checkpoint names kept."""
    read = {str(n.target).removeprefix(ADAPTER_PREFIX) for n in gm.graph.nodes if n.op == "get_attr"}
    output = next(n for n in gm.graph.nodes if n.op == "output")
    kept = []
    for local in block.state_dict():
        full = f"{block_prefix}.{local}"
        if local in read or full.rpartition(".")[0] in quantized or full not in source:
            continue
        set_tensor(gm, ADAPTER_PREFIX + local, source.tensor(full))
        with gm.graph.inserting_before(output):
            gm.graph.get_attr(ADAPTER_PREFIX + local)
        kept.append(full)
    return kept


def _is_float_weight(local: str) -> bool:
    """Model weights follow the run dtype; quantization parameters (scales, zero points) stay fp32."""
    return local.endswith((".weight", ".bias"))


def checkpoint_name(block_prefix: str, target: str) -> str:
    return f"{block_prefix}.{target.removeprefix(ADAPTER_PREFIX)}"


__all__ = [
    "Checkpoint",
    "BlockCall",
    "build_skeleton",
    "find_blocks",
    "BlockInputs",
    "capture_block_inputs",
    "probe_block_inputs",
    "flatten_block_kwargs",
    "trace_block",
    "fill_block",
    "checkpoint_name",
    "get_tensor",
]
