"""Export: a merged Hugging Face checkpoint or a GGUF file."""
