"""The models the tests share: the trained tiny LM, or a seeded one of another shape.

A plain module rather than a fixture because functions that run on ranks call it too.
"""

import torch

from lessons_lib.model import ModelConfig, TinyLM, load_tiny_lm


def tiny_lm(config: ModelConfig | None = None, seed: int = 0) -> TinyLM:
    """The trained checkpoint (committed with the course), or a model of ``config`` seeded with ``seed``."""
    if config is None:
        return load_tiny_lm()[0]
    torch.manual_seed(seed)
    return TinyLM(config).eval()
