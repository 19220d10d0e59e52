"""Save and load the tiny LM with safetensors, and fail loudly and clearly.

A checkpoint is two files side by side:

* ``NAME.safetensors``: every weight, plus the config as JSON in the file's
  metadata, so the weights alone are enough to rebuild the model;
* ``NAME.json``: the same config and, for a trained model, how it was trained,
  in a form a person can read.

safetensors stores raw tensors and a header, nothing executable (unlike a pickle),
so loading an untrusted file cannot run code.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..tokenizer import ByteTokenizer
from .config import ModelConfig
from .llama import TinyLM

TINY_LM_PATH = Path(__file__).resolve().parents[1] / "checkpoints" / "tiny_lm.safetensors"


class CheckpointError(ValueError):
    """A checkpoint file exists but cannot be used; the message says why."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """The checkpoint file does not exist."""


def save_checkpoint(model: TinyLM, path: str | Path, record: dict | None = None) -> Path:
    """Write ``model``'s weights to ``path`` and its config (plus ``record``) to a JSON beside it.

    Returns the path of the safetensors file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # contiguous() and clone(): safetensors refuses views and shared storage.
    tensors = {name: t.detach().contiguous().clone() for name, t in model.state_dict().items()}
    save_file(tensors, str(path), metadata={"config": model.config.to_json()})
    sidecar = {"config": model.config.to_dict(), **(record or {})}
    path.with_suffix(".json").write_text(json.dumps(sidecar, indent=2) + "\n", encoding="utf-8")
    return path


def _read_config(path: Path, metadata: dict | None) -> ModelConfig:
    """The config from the file's metadata, else from the JSON beside it."""
    if metadata and "config" in metadata:
        raw, where = metadata["config"], f"{path.name} metadata"
    elif path.with_suffix(".json").exists():
        raw, where = path.with_suffix(".json").read_text(encoding="utf-8"), path.with_suffix(".json").name
    else:
        raise CheckpointError(f"{path.name}: no config found (neither in the file's metadata "
                              f"nor in {path.with_suffix('.json').name})")
    try:
        data = json.loads(raw)
        return ModelConfig.from_dict(data.get("config", data))
    except (json.JSONDecodeError, ValueError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{where}: invalid model config ({e})") from None


def load_checkpoint(path: str | Path, map_location: str = "cpu") -> TinyLM:
    """Rebuild a :class:`TinyLM` from ``path`` and return it in eval mode.

    Every key and shape is checked against the config before any weight is
    copied, and errors name the file and the exact mismatch.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointNotFoundError(f"{path}: checkpoint file not found")
    try:
        with safe_open(str(path), framework="pt", device=map_location) as f:
            metadata = f.metadata()
            # Read only the header for now: names and shapes, no tensor data.
            shapes = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
            config = _read_config(path, metadata)
            # fork_rng: the random init is overwritten anyway, and loading a
            # model should not move the caller's global random state.
            with torch.random.fork_rng(devices=[]):
                model = TinyLM(config)
            expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
            _check_shapes(path, shapes, expected)
            state = {name: f.get_tensor(name) for name in expected}
    except CheckpointError:
        raise
    except Exception as e:  # safetensors raises its own error types, or OSError
        raise CheckpointError(f"{path.name}: not a readable safetensors file, it may be "
                              f"truncated or corrupt ({type(e).__name__}: {e})") from None
    model.load_state_dict(state, strict=True)
    return model.eval()


def _check_shapes(path: Path, found: dict, expected: dict) -> None:
    missing = sorted(set(expected) - set(found))
    if missing:
        raise CheckpointError(f"{path.name}: missing tensors {missing}")
    unexpected = sorted(set(found) - set(expected))
    if unexpected:
        raise CheckpointError(f"{path.name}: unexpected tensors {unexpected}")
    for name, shape in expected.items():
        if found[name] != shape:
            raise CheckpointError(f"{path.name}: {name} has shape {found[name]}, "
                                  f"config expects {shape}")


def load_tiny_lm(path: str | Path | None = None) -> tuple[TinyLM, ByteTokenizer]:
    """The course's trained tiny LM (eval mode, fp32, CPU) and its tokenizer."""
    model = load_checkpoint(TINY_LM_PATH if path is None else path)
    tokenizer = ByteTokenizer()
    if model.config.vocab_size < tokenizer.vocab_size:
        raise CheckpointError(f"vocab_size={model.config.vocab_size} in the checkpoint is smaller "
                              f"than the tokenizer's {tokenizer.vocab_size}")
    return model, tokenizer


def read_training_record(path: str | Path | None = None) -> dict:
    """The JSON written beside a checkpoint: config and training record."""
    path = Path(TINY_LM_PATH if path is None else path).with_suffix(".json")
    if not path.is_file():
        raise CheckpointNotFoundError(f"{path}: training record not found")
    return json.loads(path.read_text(encoding="utf-8"))
