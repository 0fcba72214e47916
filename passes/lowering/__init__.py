"""lowering passes."""
