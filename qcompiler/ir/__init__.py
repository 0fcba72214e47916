"""The IR: torch.fx GraphModules of ATen ops (from torch.export), plus graph helpers and block analysis."""
