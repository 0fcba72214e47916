"""2:4 weight sparsity passes (magnitude, Wanda, SparseGPT); common.py holds what they share."""
