"""ZeRO: stages 1-2 (sharded optimizer state and gradients), stage 3 (sharded parameters),
the sharded AdamW with host/disk offload, and the loss scaler (Rajbhandari et al., 2020)."""
