"""The embedded default: offline task data, the project's tokenizer and the tiny Switch SMoE zoo."""
