"""Model families (GPT, BERT, T5) and the registry that builds them from a ModelConfig."""
