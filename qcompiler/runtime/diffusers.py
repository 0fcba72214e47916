"""Loading a quantized diffusion transformer: diffusers' class built from the artefact's config, the weights outside
the blocks read from the artefact, and each block replaced by its lowered FX graph, rebuilt from the description as
for decoders (runtime/reference.py): traced again on small inputs, the recorded fusions and kernel ops applied, the
tensors read from the artefact. The source model's float weights are never read."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from qcompiler.errors import ArtifactError
from qcompiler.frontends.diffusers import (
    DIT_CLASSES,
    CompiledDitBlock,
    capture_calls,
    dit_blocks,
    example_inputs,
    model_timestep,
    trace_dit_block,
)
from qcompiler.ir.graph import eliminate_dead_attrs, set_tensor, tensor_attrs
from qcompiler.ir.rebuild import apply_kv_records, local_record, rebuild_block
from qcompiler.ir.records import KVRecord, LayerRecord, checkpoint_name


def _artefact_tensors(out: Path) -> dict[str, tuple[Path, str]]:
    index = json.loads((out / "model.safetensors.index.json").read_text())
    return {name: (out / file, name) for name, file in index["weight_map"].items()}


def _read(where: tuple[Path, str]) -> torch.Tensor:
    with safe_open(str(where[0]), framework="pt") as f:
        return f.get_tensor(where[1])


def load_quantized_dit(out: Path, desc: dict[str, Any], dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    import diffusers

    arch = desc.get("architecture")
    if arch not in DIT_CLASSES:
        raise ArtifactError(f"'{out}/qcompiler.json': architecture '{arch}' is not a diffusion transformer qcompiler "
                            f"writes ({', '.join(DIT_CLASSES)})")
    cls = getattr(diffusers, arch)
    model = cls.from_config(cls.load_config(str(out))).eval().requires_grad_(False)
    if dtype != torch.float32:
        model = model.to(dtype)
    blocks = dit_blocks(model)
    if [name for name, _ in blocks] != desc["blocks"]["names"]:
        raise ArtifactError(f"'{out}': config.json describes blocks {[n for n, _ in blocks]}, the description "
                            f"{desc['blocks']['names']}")
    where = _artefact_tensors(out)
    rest = {n for n in model.state_dict() if not any(n.startswith(b + ".") for b, _ in blocks)}
    missing = sorted(rest - where.keys())
    if missing:
        raise ArtifactError(f"'{out}': tensors {missing[:5]} are missing from the artefact; quantize again")
    model.load_state_dict({n: _read(where[n]).to(dtype) for n in rest}, strict=False)
    # the blocks' call structure, from one run on small inputs (sizes distinct, so no two dimensions are unified)
    gen = torch.Generator().manual_seed(0)
    step = {**example_inputs(model, 2, gen, latent_side=3, text_tokens=5),
            "timestep": model_timestep(model, torch.tensor(500.0), 2)}
    calls = capture_calls(model, [step])
    records: dict[str, list[LayerRecord]] = {}
    for path, data in desc["layers"].items():
        block = next((b for b, _ in blocks if path.startswith(b + ".")), None)
        if block is None:
            raise ArtifactError(f"'{out}/qcompiler.json': layer '{path}' is not inside a block; quantize again")
        records.setdefault(block, []).append(local_record(LayerRecord.from_dict(data, str(out)), block))
    kv = {block: [KVRecord.from_dict(r, str(out)) for r in recs] for block, recs in (desc.get("kv_cache") or {}).items()}
    grids = desc.get("timestep_groups")
    switched: dict[str, torch.Tensor] = {}  # (--timestep-groups) checkpoint name -> the block graph's grid tensor
    for name, block in blocks:
        call, example = calls[name][0]
        gm = trace_dit_block(block, call, example, name)
        apply_kv_records(gm, kv.get(name, []), name)  # (before the linears become kernels)
        rebuild_block(gm, records.get(name, []), name)
        for target, current in list(tensor_attrs(gm)):
            key = checkpoint_name(name, target)
            if key not in where:
                raise ArtifactError(f"'{out}': tensor '{key}' of block '{name}' is missing from the artefact")
            value = _read(where[key])
            set_tensor(gm, target, value.to(dtype) if value.is_floating_point() and current.is_floating_point() else value)
        eliminate_dead_attrs(gm)
        if grids is not None:
            switched.update({checkpoint_name(name, t): v for t, v in tensor_attrs(gm)
                             if checkpoint_name(name, t) in grids.get("grids", {})})
        parent, index = name.rsplit(".", 1)
        getattr(model, parent)[int(index)] = CompiledDitBlock(gm, call, type(block).__name__)
    if grids is not None:
        switch_grids_by_timestep(out, model, grids, switched)
    model.qcompiler_description = desc
    return model


def switch_grids_by_timestep(out: Path, model: torch.nn.Module, section: Any, tensors: dict[str, torch.Tensor]
                             ) -> None:
    """--timestep-groups: before every call of the model, write the group's value of each activation grid into the
    block graphs' grid tensors, the group chosen by the call's timestep (driver/diffusers.timestep_groups: the first
    group g with t > bounds[g], else the last)."""
    try:
        bounds = [float(b) for b in section["bounds"]]
        tables = {name: [float(v) for v in values] for name, values in section["grids"].items()}
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise ArtifactError(f"'{out}/qcompiler.json': the timestep_groups section is damaged ({e}); quantize again") \
            from None
    missing = sorted(set(tables) - set(tensors))
    if missing or any(len(values) != len(bounds) + 1 for values in tables.values()):
        raise ArtifactError(f"'{out}/qcompiler.json': timestep grids {missing[:3] or 'of the wrong length'} do not "
                            "match the blocks' tensors; quantize again")

    def select(_model: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        timestep = kwargs.get("timestep")
        if not isinstance(timestep, torch.Tensor):
            raise ArtifactError(f"'{out}': this transformer switches its activation grids by timestep; call it with "
                                "timestep= (a tensor), as diffusers' pipelines do")
        t = float(timestep.reshape(-1)[0])
        group = next((g for g, bound in enumerate(bounds) if t > bound), len(bounds))
        with torch.no_grad():
            for name, values in tables.items():
                tensors[name].fill_(values[group])

    model.register_forward_pre_hook(select, with_kwargs=True)
