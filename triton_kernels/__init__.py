"""genforge.triton_kernels."""
