"""The pipeline's orchestration: prune, the one planning step, sequential planning, the max-drop search."""
