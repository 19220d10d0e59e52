"""The course's tiny Llama-style language model: config, layers, cache, generation, checkpoints."""

from .checkpoint import (TINY_LM_PATH, CheckpointError, CheckpointNotFoundError, load_checkpoint,
                         load_tiny_lm, read_training_record, save_checkpoint)
from .config import ModelConfig
from .generate import decode_loop, generate, sample_next_token
from .kv_cache import KVCache, LayerKVCache, kv_cache_bytes_per_token
from .llama import (MLP, Attention, DecoderLayer, RMSNorm, TinyLM, apply_rotary, count_parameters,
                    make_attention_mask, make_positions, rotary_cos_sin)
from .mha import MultiHeadSelfAttention
from .perplexity import corpus_splits, mean_nll, perplexity, random_windows

__all__ = [
    "TINY_LM_PATH", "Attention", "CheckpointError", "CheckpointNotFoundError", "DecoderLayer",
    "KVCache", "LayerKVCache", "MLP", "ModelConfig", "MultiHeadSelfAttention", "RMSNorm", "TinyLM", "apply_rotary",
    "corpus_splits", "count_parameters", "decode_loop", "generate", "kv_cache_bytes_per_token", "load_checkpoint",
    "load_tiny_lm", "make_attention_mask", "make_positions", "mean_nll", "perplexity", "random_windows",
    "read_training_record", "rotary_cos_sin", "sample_next_token", "save_checkpoint",
]
