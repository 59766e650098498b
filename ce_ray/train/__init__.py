"""Training: the per-worker loop, the Ray Train and --local drivers, the checkpoint format, the run's MLflow side."""
