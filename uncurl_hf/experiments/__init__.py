"""Experiments: factor sweeps, thresholds, the paper's study."""
