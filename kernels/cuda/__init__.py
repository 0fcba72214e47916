"""CUDA kernels (Triton) for the `qc::` ops: triton_linear.py holds the kernels, dispatch.py registers them."""
