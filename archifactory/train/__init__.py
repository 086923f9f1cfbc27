"""Training: the loop, optimizers, schedules, checkpoints, distributed wrapping and metrics."""
