"""Training: heads on a backbone (train, losses, checkpoint), data for it (distill), evaluation, and MTP pretraining from scratch."""
