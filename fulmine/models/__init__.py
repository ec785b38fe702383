"""Model families, their configs, and loading weights from HF directories and GGUF files."""
