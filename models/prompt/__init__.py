"""Prompt-learning: templates, verbalizers and prompt models for classification.

template.py:      the template language (text, inputs, mask, soft tokens, truncation).
tokenization.py:  one tokenizer interface over ours and `transformers` tokenizers.
verbalizer.py:    manual (PET), knowledgeable (KPT) and soft (WARP) verbalizers.
prompt_model.py:  prompt models over a masked LM, a causal LM and an encoder-decoder.
mlm_head.py:      the MLM head the offline MiniLM lacks, trained with our trainer.
label_words.py:   label words for TREC and AG News (manual and hand-expanded).
mlm_head.py:      an MLM head for the offline MiniLM (it ships without one), trained here.

Syntax, formulas and papers: docs/prompt_learning.md.
"""
