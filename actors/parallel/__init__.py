"""Parallel strategies applied to a plain model from outside: data parallel, ZeRO, tensor,
pipeline, their composition on a mesh, the parameter server, activation checkpointing."""
