"""Model building blocks: attention, transformer blocks, positions, mixture of experts, losses."""
