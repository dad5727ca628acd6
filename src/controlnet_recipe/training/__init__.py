"""The training engine: batches, checkpoints, trackers, validation, memory settings."""
