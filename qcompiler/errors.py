"""Typed errors. Each names the thing that is wrong (file, block, node, layer) and what to do about it."""

from __future__ import annotations


class QCompilerError(Exception):
    """Base class: every error this package raises on bad input derives from it (CLI exit code 2)."""


class ModelLoadError(QCompilerError):
    """A model folder/file is missing, incomplete or of an architecture we cannot read."""


class TraceError(QCompilerError):
    """A decoder block could not be traced to an FX graph."""

    def __init__(self, block: str, op: str, detail: str):
        self.block, self.op = block, op
        super().__init__(
            f"cannot trace block '{block}': failing op '{op}': {detail}. "
            "Check that the architecture's attention implementation is 'sdpa' or 'eager' and that the block "
            "has no data-dependent Python control flow."
        )


class SchemeError(QCompilerError):
    """An unknown or invalid quantization scheme, or a scheme a target cannot run."""


class PipelineError(QCompilerError):
    """A pass pipeline string or recipe is malformed, or names an unknown pass or option."""


class PassError(QCompilerError):
    """A pass produced an invalid graph or met input it cannot handle (names the pass and node)."""


class CalibrationError(QCompilerError):
    """Calibration data is missing, too short, or produced non-finite statistics."""


class ArtifactError(QCompilerError):
    """A quantized output folder is missing, incomplete or of an unknown format version."""


class ExportError(QCompilerError):
    """A graph cannot be written in a target's format (names the block, node and op, and what is supported)."""


class UnsupportedOpError(QCompilerError):
    """An imported model uses operators the frontend has no translation for (lists every one, before any work)."""
