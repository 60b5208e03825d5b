"""Training: the trainer loop, optimizers, checkpoints, mesh and metric writers."""
