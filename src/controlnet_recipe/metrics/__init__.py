"""Metrics that tell whether a ControlNet follows its condition."""
