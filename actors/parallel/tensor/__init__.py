"""Tensor (and sequence) parallelism after Megatron-LM (Shoeybi et al. 2019; Korthikanti et al.
2022): ``ops`` (the f/g communication operators), ``layers`` (column/row/vocabulary-parallel
modules), ``plan`` (applying a family's ``tp_plan``), ``loss`` (vocabulary-parallel
cross-entropy), ``state`` (checkpoint shard/unshard), ``delta`` (LoRA split to match, deltas
re-homed on a parallelized base). docs/tensor_parallel.md has the formulas.
"""
from bmray.actors.parallel.tensor.delta import (parallelize_delta_model,
                                               tensor_parallel_module_names)
from bmray.actors.parallel.tensor.layers import (ColumnParallelLinear, RowParallelLinear,
                                                 SequenceParallelDropout,
                                                 TensorParallelAttention, VocabParallelEmbedding,
                                                 tensor_parallel_rng)
from bmray.actors.parallel.tensor.loss import (TensorParallelLM, tensor_parallel_loss,
                                               vocab_parallel_accuracy,
                                               vocab_parallel_cross_entropy)
from bmray.actors.parallel.tensor.ops import (CopyToTensorParallel, GatherFromSequenceParallel,
                                              GatherFromTensorParallel, ReduceFromTensorParallel,
                                              ReduceScatterToSequenceParallel,
                                              ScatterToSequenceParallel, split_sizes)
from bmray.actors.parallel.tensor.plan import (TensorParallelInfo, apply_tensor_parallel,
                                               sync_sequence_parallel_grads,
                                               tensor_parallel_info)
from bmray.actors.parallel.tensor.state import (gather_tensor_parallel_state,
                                                shard_tensor_parallel_state, tensor_parallel_dims)

__all__ = [
    "ColumnParallelLinear", "CopyToTensorParallel", "GatherFromSequenceParallel",
    "GatherFromTensorParallel", "ReduceFromTensorParallel", "ReduceScatterToSequenceParallel",
    "RowParallelLinear", "ScatterToSequenceParallel", "SequenceParallelDropout",
    "TensorParallelAttention", "TensorParallelInfo", "TensorParallelLM", "VocabParallelEmbedding",
    "apply_tensor_parallel", "gather_tensor_parallel_state", "parallelize_delta_model",
    "shard_tensor_parallel_state", "split_sizes", "sync_sequence_parallel_grads",
    "tensor_parallel_dims", "tensor_parallel_info", "tensor_parallel_loss",
    "tensor_parallel_module_names", "tensor_parallel_rng", "vocab_parallel_accuracy",
    "vocab_parallel_cross_entropy",
]
