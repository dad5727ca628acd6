"""The evaluate stage's parts: sampling, scoring, statistics, probes, the checkpoint sweep."""
