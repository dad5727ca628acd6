"""The GPU-memory planner: the training step and validation measured on fake tensors, per tier."""
