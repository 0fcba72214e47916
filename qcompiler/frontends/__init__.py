"""Frontends: model sources imported into the FX IR (Hugging Face checkpoints here; ONNX later)."""
