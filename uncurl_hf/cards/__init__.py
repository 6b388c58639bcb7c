"""Model cards of pruned and recovered outputs."""
