"""Training: data, the training loop, distributed runs, the dense pretraining and the ShiftAddViT fine-tuning."""
