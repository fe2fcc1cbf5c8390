"""Training (``byteify train``): the recipe schema, the trainer and its stage runners (plain,
LoRA, source-aligned distillation), checkpoints and resume, and distributed (FSDP2) runs."""
