"""Training: the trainer in phases, schedule, checkpoints, run folder, tracking, distributed."""
