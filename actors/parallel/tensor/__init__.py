"""Tensor (and sequence) parallelism after Megatron-LM (Shoeybi et al., 2019; Korthikanti et al., 2022)."""
