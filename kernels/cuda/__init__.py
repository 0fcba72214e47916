"""CUDA kernels for the `qc::` ops: dispatch.py registers them, table.py picks one per op and M bucket (from
measured_table.json, measured on a GPU by benchmarks/cuda_kernels.py), tinygemm.py wraps torch's int4 kernel and
triton_linear.py holds our autotuned Triton GEMMs and the one-launch activation quantizer / weight dequantizer."""
