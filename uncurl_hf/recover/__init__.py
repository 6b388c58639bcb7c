"""Recovery fine-tuning (LoRA) after pruning."""
