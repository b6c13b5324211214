"""Training: the two phases (projector pretraining, fine-tuning on target answers) and their data."""
