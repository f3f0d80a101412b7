"""Quantized weights: GGML block formats, their kernels and the QuantLinear layers built on them."""
