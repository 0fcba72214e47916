"""Ascend NPU: emulation of the torch_npu kernels the lowered graph calls (npu_ops.py), registered in dispatch.py."""
