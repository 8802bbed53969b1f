"""ZeRO (Rajbhandari et al. 2020): stages 0-2 (stage12.py) and 3 (stage3.py), the pieces they
and the mesh share (config, sharded_optimizer, consolidated_state, memory), the sharded AdamW
with host/disk offload (offload.py) and the fp16 loss scaler. See docs/zero.md."""
