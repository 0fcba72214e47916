"""The ONNX format: one decoder with a KV cache for onnxruntime / onnxruntime-genai (decoder.py), any lowered graph
emitted rule by rule (emit.py), into a graph whose weights stream to one external-data file (builder.py)."""
