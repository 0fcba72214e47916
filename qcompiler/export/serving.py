"""Writing a serving engine's checkpoint format block by block (compressed-tensors, AWQ, GPTQ, msModelSlim).

A `ServingFormat` turns each original layer (export/layers.py) into the tensors its consumer loads; the
`FormatExporter` streams: every lowered block becomes one safetensors shard as soon as it is finished, the
embeddings / final norm / head come last, then the index, config.json (with the format's quantization
config), the tokenizer and the format's description file. The folder OUT/<format.folder>/ is written inside
the artefact's temporary folder, so it appears complete or not at all (the artefact is renamed into place).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors.torch import save_file
from torch import fx

from qcompiler.errors import ArtifactError, ExportError
from qcompiler.export.artifact import PROCESSOR_FILES, SavedExporter
from qcompiler.export.layers import ExportLayer, WrittenLayer, from_record
from qcompiler.files import plain_file_name
from qcompiler.frontends.conversions import converted_config
from qcompiler.frontends.moe import module_aliases
from qcompiler.ir.graph import is_code_constant, tensor_attrs
from qcompiler.ir.records import KVRecord, LayerRecord, checkpoint_name
from qcompiler.schemes import QuantScheme

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "generation_config.json", "chat_template.jinja")


class ServingFormat(Protocol):
    name: str  # as in --target-option format=NAME
    folder: str  # OUT/<folder>/
    shard_prefix: str  # <prefix>-00001-of-0000N.safetensors and <prefix>.safetensors.index.json
    consumers: str  # who loads it (README matrix)
    # whether its clients read a model's experts one linear each where the source checkpoint stores them stacked
    # (GraniteMoE, gpt-oss, Llama 4): True for every family (our msModelSlim loader), False for none (AWQ / GPTQ:
    # their clients read the checkpoint's layout), or the model_types whose clients do (compressed-tensors: vLLM's
    # loaders of those families map per-expert names too)
    unstacked_experts: bool | frozenset[str]
    # model_type -> {our per-expert linear's leaf name: the one its clients read} (GraniteMoE on compressed-tensors:
    # vLLM reads experts.<e>.w1 / w3 / w2); families not listed keep our names (experts.<e>.gate_proj / ...)
    expert_leaves: Mapping[str, Mapping[str, str]]
    # whether a layer can read its input through a learned Kronecker transform with a clip ratio (FlatQuant's
    # left_trans / right_trans / clip_ratio: msModelSlim's W4A4_FLATQUANT_DYNAMIC); no format holds an online Hadamard
    learned_transforms: bool

    def unsupported_reason(self, scheme: QuantScheme) -> str | None: ...

    def layer_tensors(self, layer: ExportLayer, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """Tensor suffix ("weight_packed", ...) -> tensor, for one layer of a model in `dtype`; raises
        ExportError if the format cannot hold it."""
        ...

    def kv_cache_tensors(self, records: Sequence[KVRecord], tensors: dict[str, torch.Tensor],
                         dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """Checkpoint name -> tensor of one block's KV-cache quantization (`records`: kv_records of the block,
        `tensors` its tensors by checkpoint name); raises ExportError if the format cannot hold it."""
        ...

    def finish(self, folder: Path, config: dict[str, Any], layers: Sequence[WrittenLayer],
               float_tensors: Sequence[str], float_linears: Sequence[str], kv_tensors: Sequence[str],
               kv_args: dict[str, Any] | None) -> None:
        """Write config.json (given the source config without quantization_config) and any description file.
        float_tensors: every tensor written unquantized; float_linears: the model's linear layers left in float
        (a tied head included, though its weight is the embedding's); kv_tensors / kv_args: the KV-cache
        scales written and the KV cache's QuantArgs (None: float cache)."""
        ...


def source_dtype(config: dict[str, Any]) -> torch.dtype:
    name = config.get("torch_dtype") or config.get("dtype") or "float32"
    return {"float16": torch.float16, "bfloat16": torch.bfloat16}.get(str(name), torch.float32)


def expert_checkpoint_name(leaves: Mapping[str, str], module: str) -> str:
    """A linear's name in a format's checkpoint: ours, or for one expert's linear, the leaf the format's clients read
    for this family (`leaves`: the format's expert_leaves[model_type]; `...experts.3.gate_proj` -> `...experts.3.w1`)."""
    parent, _, leaf = module.rpartition(".")
    if leaf in leaves and parent.rpartition(".")[2].isdigit() and ".experts." in f"{parent}.":
        return f"{parent}.{leaves[leaf]}"
    return module


@dataclasses.dataclass
class BlockTensors:
    """A lowered block's tensors as a format sees them."""

    tensors: dict[str, torch.Tensor]  # every tensor of the block graph, by checkpoint name
    layers: list[ExportLayer]  # the original linears of the layer records (fused groups split back)
    rest: dict[str, torch.Tensor]  # the others under the model's own names (norms, smoothed ones, the block's biases)


def split_block(who: str, name: str, gm: fx.GraphModule, layers: Mapping[str, LayerRecord], kv: Sequence[KVRecord],
                state_names: set[str]) -> BlockTensors:
    """The block's quantized layers and its remaining tensors; ExportError naming the tensor where the graph holds
    one the model's own modules do not (a transformation left a graph-only op that `who`'s format cannot express)."""
    tensors = {checkpoint_name(name, t): v for t, v in tensor_attrs(gm)}
    used: set[str] = set()
    split: list[ExportLayer] = []
    for rec in layers.values():
        used.update(rec.tensors.values())
        if rec.bias:
            used.add(rec.bias)
        split.extend(from_record(rec, tensors))
    for kv_rec in kv:
        used.update((kv_rec.tensors or {}).values())
    rest = {}
    for k, v in tensors.items():
        if k in used or is_code_constant(k):
            continue
        if k not in state_names:
            raise ExportError(
                f"{who}: block '{name}' holds tensor '{k}' that the model's own layers do not have "
                "(a transformation left a graph-only op, e.g. an unfolded smoothing scale); its serving "
                f"format cannot express it. Use a pipeline whose scales fold into norms or linears."
            )
        rest[k] = v
    return BlockTensors(tensors, split, rest)


class FormatExporter:
    """A BlockExporter (targets/base.py) for one ServingFormat."""

    def __init__(self, out_dir: Path, model: torch.nn.Module, fmt: ServingFormat, source: Path,
                 saved: SavedExporter | None = None):
        self.fmt = fmt
        self.folder = out_dir / fmt.folder
        self.source = Path(source)
        self.config = json.loads((self.source / "config.json").read_text())
        self.config = converted_config(self.config) or self.config  # (a converted family: the native architecture it was read as)
        self.dtype = source_dtype(self.config)
        self.state_names = set(model.state_dict().keys())
        self.linear_names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
        # modules the checkpoint names differently: a float one is listed under both names (clients match either)
        self.aliases = module_aliases(model)
        stacked = [n for n, m in model.named_modules() if getattr(m, "stored_stacked", False)]
        unstacked = fmt.unstacked_experts
        if stacked and not (unstacked is True or (unstacked and self.config.get("model_type") in unstacked)):
            raise ExportError(f"{fmt.name}: the checkpoint stores the experts of '{stacked[0]}' stacked (one tensor "
                              "per layer), the layout this format's clients read them in for this architecture; it "
                              "holds quantized experts one linear each only (use --target ascend or reference)")
        self.leaves = fmt.expert_leaves.get(str(self.config.get("model_type")), {})
        self.shards: list[tuple[str, list[str]]] = []
        self.layers: list[WrittenLayer] = []
        self.float_tensors: list[str] = []
        self.kv_tensors: list[str] = []  # KV-cache scales written (names as the format has them)
        self.kv_args: dict[str, Any] | None = None  # the KV cache's QuantArgs (as a dict), when quantized
        self.blocks: list[str] = []  # every block written (a DiT has two lists: double- and single-stream)
        if saved is None:
            self.folder.mkdir()
        else:
            self._restore(saved)

    def save_state(self, folder: Path, tag: str) -> dict[str, Any]:
        """Everything written so far, as JSON (the shards are already on disk in `self.folder`)."""
        return {"shards": [[name, names] for name, names in self.shards],
                "layers": [dataclasses.asdict(layer) for layer in self.layers],
                "float_tensors": self.float_tensors, "kv_tensors": self.kv_tensors, "kv_args": self.kv_args,
                "blocks": self.blocks}

    def _restore(self, saved: SavedExporter) -> None:
        where = f"'{saved.folder}': {self.fmt.name} exporter state"
        try:
            for name, names in saved.get("shards", list):
                plain_file_name(name, where, ArtifactError, "run without --resume to start over")
                if not name.startswith("shard-"):  # (it may be renamed already: finish checks it is on disk)
                    raise ArtifactError(f"{where}: '{name}' is not a shard name; run without --resume to start over")
                self.shards.append((name, [str(n) for n in names]))
            self.layers = [WrittenLayer.from_dict(d) for d in saved.get("layers", list)]
            self.float_tensors = [str(n) for n in saved.get("float_tensors", list)]
            self.kv_tensors = [str(n) for n in saved.get("kv_tensors", list)]
            self.kv_args = saved.get("kv_args", dict | type(None))
            self.blocks = [str(n) for n in saved.get("blocks", list)]
        except (TypeError, ValueError, KeyError) as e:
            raise ArtifactError(f"{where} is damaged ({e}); run without --resume to start over") from None

    def _write(self, tensors: dict[str, torch.Tensor]) -> None:
        name = f"shard-{len(self.shards):05d}.safetensors"
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(self.folder / name),
                  metadata={"format": "pt"})
        self.shards.append((name, list(tensors)))

    def add_block(self, index: int, name: str, gm: fx.GraphModule, layers: Mapping[str, LayerRecord],
                  kv: Sequence[KVRecord]) -> None:
        self.blocks.append(name)
        for rec in layers.values():
            if rec.input_rotation and not (rec.input_rotation == "kronecker" and self.fmt.learned_transforms):
                hint = ("flatquant absorbs rotate's online Hadamard only where both Kronecker factors of the "
                        "input size have a Hadamard matrix: rotate{online=false}" if self.fmt.learned_transforms
                        else "rotate{online=false}, no flatquant")
                raise ExportError(f"{self.fmt.name}: layer '{rec.path}' reads its input through an online transform "
                                  f"({rec.input_rotation}), which this format cannot express; {hint}")
        block = split_block(self.fmt.name, name, gm, layers, kv, self.state_names)
        out: dict[str, torch.Tensor] = {}
        for layer in block.layers:
            layer = dataclasses.replace(layer, name=self.checkpoint_name(layer.name))
            if layer.bits is None and not layer.sparse:
                assert layer.weight is not None
                out[layer.name + ".weight"] = layer.weight.to(self.dtype)
                if layer.bias is not None:
                    out[layer.name + ".bias"] = layer.bias.to(self.dtype)
                self.float_tensors.extend(k for k in (layer.name + ".weight", layer.name + ".bias") if k in out)
            else:
                out.update(self._quantized_layer(layer))
        if kv:
            try:
                written_kv = self.fmt.kv_cache_tensors(kv, block.tensors, self.dtype)
            except ExportError as e:
                raise ExportError(f"{self.fmt.name}: block '{name}': KV cache: {e}") from None
            out.update(written_kv)
            self.kv_tensors.extend(written_kv)
            self.kv_args = dict(kv[0].args)
        for k, v in block.rest.items():
            out[k] = v.to(self.dtype) if v.is_floating_point() else v
            self.float_tensors.append(k)
        self._write(out)

    def finish(self, model: torch.nn.Module, metadata: dict[str, str]) -> None:
        quantized_outside = self._outer_quantized_layers(model)
        inside = tuple(f"{b}." for b in self.blocks) + tuple(f"{n}." for n in quantized_outside)
        rest = {n: p.detach().to(self.dtype) for n, p in model.named_parameters(remove_duplicate=True)
                if not n.startswith(inside)}
        self._write(rest)
        self.float_tensors.extend(rest)
        total = len(self.shards)
        weight_map: dict[str, str] = {}
        size = 0
        for i, (tmp_name, names) in enumerate(self.shards):
            final = f"{self.fmt.shard_prefix}-{i + 1:05d}-of-{total:05d}.safetensors"
            if (self.folder / tmp_name).is_file():
                (self.folder / tmp_name).rename(self.folder / final)
            elif not (self.folder / final).is_file():  # (else: renamed already by a finish that was killed)
                raise ArtifactError(f"'{self.folder}': shard '{tmp_name}' is missing; run without --resume to start over")
            size += (self.folder / final).stat().st_size
            weight_map.update(dict.fromkeys(names, final))
        index = {"metadata": {"total_size": size}, "weight_map": dict(sorted(weight_map.items()))}
        (self.folder / f"{self.fmt.shard_prefix}.safetensors.index.json").write_text(json.dumps(index, indent=2))
        for f in (*TOKENIZER_FILES, *PROCESSOR_FILES):
            if (self.source / f).is_file():
                shutil.copy2(self.source / f, self.folder / f)
        config = {k: v for k, v in self.config.items() if k != "quantization_config"}
        if getattr(model.config, "tie_word_embeddings", None) is False and config.get("tie_word_embeddings"):
            config["tie_word_embeddings"] = False  # (a rotation gave the head its own weight)
        quantized = {layer.name for layer in self.layers}
        linears = [self.checkpoint_name(n) for n in self.linear_names]
        self.fmt.finish(self.folder, config, self.layers, self.float_tensors,
                        sorted({a for n in linears if n not in quantized for a in (n, self.aliases.get(n, n))}),
                        self.kv_tensors, self.kv_args)

    def checkpoint_name(self, module: str) -> str:
        return expert_checkpoint_name(self.leaves, module)

    def _quantized_layer(self, layer: ExportLayer) -> dict[str, torch.Tensor]:
        """The format's tensors of one quantized layer under checkpoint names, the layer noted as written."""
        try:
            written = {f"{layer.name}.{suffix}": t for suffix, t in self.fmt.layer_tensors(layer, self.dtype).items()}
        except ExportError as e:
            raise ExportError(f"{self.fmt.name}: layer '{layer.name}': {e}") from None
        self.layers.append(layer.written(list(written)))
        return written

    def _outer_quantized_layers(self, model: torch.nn.Module) -> list[str]:
        """Write the quantized linears outside the blocks (a VLM's vision tower under --vision-scheme: modules that
        carry their LayerRecord, frontends/vision.py) in the format, as a block's layers are; returns their paths."""
        paths = []
        out: dict[str, torch.Tensor] = {}
        for mod in model.modules():
            record = getattr(mod, "layer_record", None)
            if not isinstance(record, LayerRecord):
                continue
            for layer in from_record(record, mod.record_tensors()):
                out.update(self._quantized_layer(layer))
            paths.append(record.path)
        if out:
            self._write(out)
        return paths

    def abort(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


class Exporters:
    """Several BlockExporters fed the same blocks (a target writing more than one format)."""

    def __init__(self, exporters: Sequence[Any]):
        self.exporters = list(exporters)

    @classmethod
    def of(cls, out_dir: Path, model: torch.nn.Module, formats: Sequence[ServingFormat], source: Path,
           saved: SavedExporter | None = None) -> Exporters:
        """One FormatExporter per format (continuing from `saved`: the state `save_state` wrote)."""
        parts: list[SavedExporter | None] = [None] * len(formats)
        if saved is not None:
            states = saved.get("formats", list)
            if len(states) != len(formats) or not all(isinstance(st, dict) for st in states):
                raise ArtifactError(f"'{saved.folder}': the exporter state holds {len(states)} formats, this run "
                                    f"writes {len(formats)}; run without --resume to start over")
            parts = [SavedExporter(st, saved.folder) for st in states]
        return cls([FormatExporter(out_dir, model, f, source, p) for f, p in zip(formats, parts, strict=True)])

    def save_state(self, folder: Path, tag: str) -> dict[str, Any]:
        return {"formats": [e.save_state(folder, f"{tag}-{i}") for i, e in enumerate(self.exporters)]}

    def add_block(self, index: int, name: str, gm: fx.GraphModule, layers: Mapping[str, LayerRecord],
                  kv: Sequence[KVRecord]) -> None:
        for e in self.exporters:
            e.add_block(index, name, gm, layers, kv)

    def finish(self, model: torch.nn.Module, metadata: dict[str, str]) -> None:
        for e in self.exporters:
            e.finish(model, metadata)

    def abort(self) -> None:
        for e in self.exporters:
            e.abort()
