"""The Gradio Space: original vs pruned side by side."""
