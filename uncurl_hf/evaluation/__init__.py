"""Evaluation: tasks, scoring (seq2seq and causal LM), metric modules."""
