"""Quantization algorithms as pure tensor functions (GPTQ, AWQ): no graphs, unit-tested directly."""
