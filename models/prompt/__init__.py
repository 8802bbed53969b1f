"""Prompt-learning: templates, verbalizers, prompt models, and the MLM head they score with."""
