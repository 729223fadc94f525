"""Training: the LoRA plan, the loop, checkpoints and torchrun."""
