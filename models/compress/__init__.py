"""Compression: distillation losses, pruning, quantization, MoEfication, weight sharing,
low-rank factorisation and streamed low-resource inference, applied to a plain model from
outside (BMCook and BMInf's techniques). Docs: docs/compression.md."""
