"""4-bit NF4 weights: bitsandbytes on CUDA, the same codes in pure torch elsewhere; the quantized backbone."""
