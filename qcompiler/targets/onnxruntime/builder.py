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
from onnx import TensorProto, helper

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

    # A pickled builder (the driver's per-block checkpoint, for --resume) records how far the data file had
    # been written; unpickling truncates the file there and appends from that point again.
    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        if not self._data.closed:
            self._data.flush()
            state["_data_offset"] = self._data.tell()
        else:
            state["_data_offset"] = None
        del state["_data"]
        return state

    def __setstate__(self, state: dict) -> None:
        offset = state.pop("_data_offset")
        self.__dict__.update(state)
        path = self.model_path.parent / self.data_name
        self._data = open(path, "r+b" if path.exists() else "wb")  # noqa: SIM115 (closed in finish)
        if offset is not None:
            self._data.truncate(offset)
            self._data.seek(offset)

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
