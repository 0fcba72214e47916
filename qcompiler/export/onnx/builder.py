"""An ONNX graph under construction, with initializers streamed to one external-data file as they come.

Large models never build a protobuf holding their weights: every initializer above `INLINE_BYTES` is
appended to `<model>.onnx.data` (page-aligned, so onnxruntime can memory-map it) and the TensorProto only
records (location, offset, length). The 2 GB protobuf limit therefore never applies, and a block's tensors
can be freed as soon as they are written.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from google.protobuf.message import DecodeError
from onnx import TensorProto, helper

from qcompiler.errors import ArtifactError
from qcompiler.export.artifact import SavedExporter

MODEL_FILE = "model.onnx"  # the file name every exported folder uses (genai_config.json names it too)
OPSET = 23
MS_DOMAIN = "com.microsoft"
INLINE_BYTES = 1024
ALIGN = 4096

_TORCH_TO_NP = {
    torch.float32: np.float32, torch.float16: np.float16, torch.int64: np.int64, torch.int32: np.int32,
    torch.int8: np.int8, torch.uint8: np.uint8, torch.bool: np.bool_,
}


def to_numpy(t: torch.Tensor | np.ndarray) -> np.ndarray:
    if isinstance(t, np.ndarray):
        return t
    t = t.detach().cpu().contiguous()
    if t.dtype not in _TORCH_TO_NP:
        raise TypeError(f"tensor dtype {t.dtype} has no ONNX export here (export float32 models)")
    return t.numpy()


class OnnxBuilder:
    def __init__(self, model_path: Path, opset: int = OPSET):
        self.model_path = Path(model_path)
        self.opset = opset
        self.data_name = self.model_path.name + ".data"
        self._data = open(self.model_path.parent / self.data_name, "wb")  # noqa: SIM115 (closed in finish)
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self._names: set[str] = set()
        self._consts: dict[tuple, str] = {}
        self.shared: dict[str, str] = {}  # shared_initializer key -> initializer name

    # ------------------------------------------------------------------ progress (--resume)
    def save_state(self, folder: Path, tag: str) -> dict[str, Any]:
        """The graph so far as an ONNX GraphProto file `<tag>.graph.pb` in `folder` (protobuf: data, never code)
        and the rest as JSON: names in use, shared constants, and how far the data file has been written."""
        self._data.flush()
        graph = helper.make_graph(self.nodes, "state", self.inputs, self.outputs, self.initializers)
        graph_file = f"{tag}.graph.pb"
        tmp = folder / (graph_file + ".tmp")
        tmp.write_bytes(graph.SerializeToString())
        tmp.replace(folder / graph_file)
        return {"graph": graph_file, "opset": self.opset, "data_bytes": self._data.tell(),
                "names": sorted(self._names), "shared": self.shared,
                "consts": [[dtype, list(shape), data.hex(), name] for (dtype, shape, data), name in self._consts.items()]}

    @classmethod
    def restore(cls, model_path: Path, saved: SavedExporter) -> OnnxBuilder:
        """The builder `save_state` described, writing to `model_path` (given by the caller, never read from
        the state); its data file is cut back to where the state was saved, so what follows is appended once."""
        where = f"'{saved.folder}': ONNX exporter state"
        b = cls.__new__(cls)
        b.model_path = Path(model_path)
        b.opset = saved.get("opset", int)
        b.data_name = b.model_path.name + ".data"
        path = b.model_path.parent / b.data_name
        offset = saved.get("data_bytes", int)
        if not path.is_file() or not 0 <= offset <= path.stat().st_size:
            raise ArtifactError(f"{where}: '{path}' is missing or shorter than the {offset} bytes written; run without "
                                "--resume to start over")
        try:
            graph = onnx.GraphProto.FromString(saved.file("graph").read_bytes())
            b._names = {str(n) for n in saved.get("names", list)}
            b.shared = {str(k): str(v) for k, v in saved.get("shared", dict).items()}
            b._consts = {(str(d), tuple(int(x) for x in shape), bytes.fromhex(data)): str(name)
                         for d, shape, data, name in saved.get("consts", list)}
        except (OSError, ValueError, TypeError, DecodeError) as e:
            raise ArtifactError(f"{where} is damaged ({' '.join(str(e).split())[:200]}); run without --resume to "
                                "start over") from None
        b.nodes, b.initializers = list(graph.node), list(graph.initializer)
        b.inputs, b.outputs = list(graph.input), list(graph.output)
        written = max((int(e["offset"]) + int(e["length"]) for t in b.initializers if t.data_location == TensorProto.EXTERNAL
                       for e in [{x.key: x.value for x in t.external_data}]), default=0)
        if offset < written:
            raise ArtifactError(f"{where}: the graph's initializers reach byte {written} of '{path}' but the state says "
                                f"{offset} bytes were written; run without --resume to start over")
        b._data = open(path, "r+b")  # noqa: SIM115 (closed in finish)
        b._data.truncate(offset)
        b._data.seek(offset)
        return b

    # ------------------------------------------------------------------ names, nodes, tensors
    def fresh(self, hint: str) -> str:
        base = hint.replace(" ", "_") or "v"
        name, i = base, 1
        while name in self._names:
            name, i = f"{base}_{i}", i + 1
        self._names.add(name)
        return name

    def node(self, op: str, inputs: Sequence[str], name: str, n_out: int = 1, domain: str = "",
             outputs: Sequence[str] | None = None, **attrs: Any) -> list[str]:
        outs = list(outputs) if outputs is not None else [self.fresh(f"{name}/out{i}") for i in range(n_out)]
        for o in outs:
            self._names.add(o)
        attrs = {k: v for k, v in attrs.items() if v is not None}
        self.nodes.append(helper.make_node(op, list(inputs), outs, name=self.fresh(name), domain=domain, **attrs))
        return outs

    def copy_node(self, op: str, domain: str, inputs: Sequence[str], name: str, n_out: int,
                  attributes: Sequence[onnx.AttributeProto]) -> list[str]:
        """A node of an imported model, written back with its original attributes."""
        outs = [self.fresh(f"{name}/out{i}") for i in range(n_out)]
        node = helper.make_node(op, list(inputs), outs, name=self.fresh(name), domain=domain)
        node.attribute.extend(attributes)
        self.nodes.append(node)
        return outs

    def op(self, op: str, inputs: Sequence[str], name: str, domain: str = "", **attrs: Any) -> str:
        return self.node(op, inputs, name, 1, domain, **attrs)[0]

    def shared_initializer(self, key: str, make: Callable[[], torch.Tensor | np.ndarray]) -> str:
        """One initializer for every use of `key` (made on first use), e.g. a constant transform every block reads."""
        if key not in self.shared:
            self.shared[key] = self.initializer(key, make())
        return self.shared[key]

    def initializer(self, hint: str, value: torch.Tensor | np.ndarray) -> str:
        arr = to_numpy(value)
        arr = arr if arr.flags.c_contiguous else arr.copy(order="C")  # (np.ascontiguousarray makes 0-d arrays 1-d)
        name = self.fresh(hint)
        if arr.nbytes <= INLINE_BYTES:
            self.initializers.append(onnx.numpy_helper.from_array(arr, name))
            return name
        t = TensorProto()
        t.name = name
        t.data_type = helper.np_dtype_to_tensor_dtype(arr.dtype)
        t.dims.extend(arr.shape)
        pad = (-self._data.tell()) % ALIGN
        if pad:
            self._data.write(b"\0" * pad)
        offset = self._data.tell()
        self._data.write(arr.tobytes())
        t.data_location = TensorProto.EXTERNAL
        for k, v in (("location", self.data_name), ("offset", str(offset)), ("length", str(arr.nbytes))):
            entry = t.external_data.add()
            entry.key, entry.value = k, v
        self.initializers.append(t)
        return name

    def const(self, value: float | int | Sequence[int] | Sequence[float], dtype: type = np.float32) -> str:
        """A small constant initializer, shared by value."""
        arr: np.ndarray = np.asarray(value, dtype=dtype)
        key = (arr.dtype.str, arr.shape, arr.tobytes())
        if key not in self._consts:
            self._consts[key] = self.initializer(f"const_{arr.dtype.name}", arr)
        return self._consts[key]

    def add_input(self, name: str, elem_type: int, shape: Sequence[int | str]) -> str:
        self._names.add(name)
        self.inputs.append(helper.make_tensor_value_info(name, elem_type, list(shape)))
        return name

    def add_output(self, name: str, elem_type: int, shape: Sequence[int | str]) -> None:
        self.outputs.append(helper.make_tensor_value_info(name, elem_type, list(shape)))

    # ------------------------------------------------------------------ writing
    def finish(self, graph_name: str, metadata: dict[str, str] | None = None) -> onnx.ModelProto:
        """Write `model_path` (graph only; weights are already in the data file) and return the model
        (its initializers reference the data file)."""
        self._data.close()
        graph = helper.make_graph(self.nodes, graph_name, self.inputs, self.outputs, self.initializers)
        model = helper.make_model(
            graph, opset_imports=[helper.make_opsetid("", self.opset), helper.make_opsetid(MS_DOMAIN, 1)],
            producer_name="qcompiler",
        )
        model.ir_version = 10
        for k, v in (metadata or {}).items():
            entry = model.metadata_props.add()
            entry.key, entry.value = k, v
        onnx.save_model(model, str(self.model_path))
        return model

    def abort(self) -> None:
        if not self._data.closed:
            self._data.close()
