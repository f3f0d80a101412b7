"""The neural networks, as plain PyTorch modules that only hold weights (per-request state lives elsewhere).

- text.py: the Qwen2 decoder (also the language half of Qwen2-VL / Qwen2.5-VL);
- vision.py: the Qwen2-VL / Qwen2.5-VL vision encoder (ViT + PatchMerger): patches → embeddings;
- rope.py: rotary position embeddings for the text decoder: 1-D RoPE and M-RoPE.
"""
