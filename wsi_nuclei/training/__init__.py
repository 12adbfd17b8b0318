"""Training and evaluation: datasets, targets, stain, the training run, metrics, context, validation."""
