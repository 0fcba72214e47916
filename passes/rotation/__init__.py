"""Rotation passes (QuaRot-style Hadamard rotations of the residual stream and the MLP)."""
