"""Model files: HF checkpoints (hf.py), GGUF files (gguf.py), the one HF ↔ GGUF tensor-name table
(names.py), GGUF → HF checkpoint export (export.py), and the common view loaders hand over (checkpoint.py)."""
