"""Continual pre-training and LoRA/QLoRA fine-tuning."""
