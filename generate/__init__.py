"""Mass knowledge generation (vLLM on GPUs, transformers on CPU)."""
