"""Parallelism (lessons 02, 11-14): one mesh of ranks, and data, tensor and pipeline parallelism on it.

The pipeline's names are in its own face, ``lessons_lib.parallel.pipeline``.
"""

from .data import DataParallelInference, data_parallel_generate, gather_rows, local_rows, row_range, split_sizes
from .mesh import Mesh, groups_along, mesh_grid, mesh_sizes, rank_at, rank_coords
from .plan import (STYLES, Colwise, LocalCount, Rowwise, SequenceParallel, Vocab, VocabHead, describe_shards,
                   parallelize, tiny_lm_sp_plan, tiny_lm_tp_plan, torch_tp_plan, validate_tp)
from .sequence import (SequenceParallelEmbedding, SequenceParallelNorm, SequenceParallelRowLinear,
                       check_sequence_split, gather_sequence, reduce_scatter_sequence, scatter_sequence,
                       sequence_bytes_sent)
from .tensor import (ColumnParallelLinear, ParallelLMHead, RowParallelLinear, VocabParallelEmbedding,
                     all_gather_last_dim, all_reduce_sum, group_rank, group_size, shard_indices, split_last_dim)

__all__ = ["STYLES", "ColumnParallelLinear", "Colwise", "DataParallelInference", "LocalCount", "Mesh",
           "ParallelLMHead", "RowParallelLinear", "Rowwise", "SequenceParallel", "SequenceParallelEmbedding",
           "SequenceParallelNorm", "SequenceParallelRowLinear", "Vocab", "VocabHead", "VocabParallelEmbedding",
           "all_gather_last_dim", "all_reduce_sum", "check_sequence_split", "data_parallel_generate",
           "describe_shards", "gather_rows", "gather_sequence", "group_rank", "group_size", "groups_along",
           "local_rows", "mesh_grid", "mesh_sizes", "parallelize", "rank_at", "rank_coords", "reduce_scatter_sequence",
           "row_range", "scatter_sequence", "sequence_bytes_sent", "shard_indices", "split_last_dim", "split_sizes",
           "tiny_lm_sp_plan", "tiny_lm_tp_plan", "torch_tp_plan", "validate_tp"]
