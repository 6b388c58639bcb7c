"""Calibration: forward the data once with hooks on every router -> ExpertStats per layer."""
