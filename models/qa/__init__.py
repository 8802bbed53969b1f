"""Question answering: the extractive span reader, SQuAD EM/F1, the open-domain pipeline."""
