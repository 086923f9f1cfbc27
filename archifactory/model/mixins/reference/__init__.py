"""Pure-PyTorch math shared by the mixins' reference paths (runs on CPU; the oracle for the fused kernels)."""
