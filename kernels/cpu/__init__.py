"""CPU kernels for the qc:: ops (torch's own int8/int4 CPU GEMMs)."""
