"""KV-cache quantization passes."""
