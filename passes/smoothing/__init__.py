"""smoothing passes."""
