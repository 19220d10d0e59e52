"""Save and load the tiny LM with safetensors, and fail loudly and clearly.

A checkpoint is two files side by side:

* ``NAME.safetensors``: every weight, plus the config as JSON in the file's
  metadata, so the weights alone are enough to rebuild the model;
* ``NAME.json``: the same config and, for a trained model, how it was trained,
  in a form a person can read.

safetensors stores raw tensors and a header, nothing executable (unlike a pickle),
so loading an untrusted file cannot run code. It has no checksum, though: a flipped
bit in a weight loads without complaint. So ``save_checkpoint`` records two digests
and ``load_checkpoint`` verifies whichever it finds, raising
:class:`CheckpointCorruptError` on a mismatch:

* ``sha256`` in ``NAME.json``: SHA-256 of the whole safetensors file, every byte;
* ``fingerprint`` in ``NAME.json`` and in the file's metadata: lesson 05's
  :func:`~lessons_lib.model.fingerprint.state_fingerprint` of the weights, the
  same digest a replica reports for what it has in memory.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .fingerprint import short, state_fingerprint
from ..tokenizer import ByteTokenizer
from ..validate import bad
from .config import ModelConfig
from .llama import TinyLM

TINY_LM_PATH = Path(__file__).resolve().parents[1] / "checkpoints" / "tiny_lm.safetensors"


class CheckpointError(ValueError):
    """A checkpoint file exists but cannot be used; the message says why."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """The checkpoint file does not exist."""


class CheckpointCorruptError(CheckpointError):
    """The checkpoint's bytes or weights differ from the digest recorded when it was saved."""


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file's bytes, read in chunks (a checkpoint may not fit in memory twice)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def save_checkpoint(model: TinyLM, path: str | Path, record: dict | None = None) -> Path:
    """Write ``model``'s weights to ``path`` and its config (plus ``record``) to a JSON beside it.

    The JSON also gets the file's ``sha256`` and the weights' ``fingerprint``, which
    ``load_checkpoint`` verifies. Returns the path of the safetensors file.
    """
    if not isinstance(model, TinyLM):
        raise bad("model", model, "a TinyLM")
    if record is not None and not isinstance(record, dict):
        raise bad("record", record, "a dict of JSON-serialisable values, or None")
    path = _check_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # contiguous() and clone(): safetensors refuses views and shared storage.
    tensors = {name: t.detach().contiguous().clone() for name, t in model.state_dict().items()}
    fingerprint = state_fingerprint(tensors)
    save_file(tensors, str(path), metadata={"config": model.config.to_json(), "fingerprint": fingerprint})
    sidecar = {"config": model.config.to_dict(), **(record or {}),
               "sha256": file_sha256(path), "fingerprint": fingerprint}
    path.with_suffix(".json").write_text(json.dumps(sidecar, indent=2) + "\n", encoding="utf-8")
    return path


def _check_path(path) -> Path:
    if not isinstance(path, (str, os.PathLike)):
        raise bad("path", path, "a file path (str or pathlib.Path)")
    return Path(path)


def _check_device(map_location) -> str:
    expected = "'cpu', or 'cuda' / 'cuda:N' on a machine with CUDA"
    try:
        device = torch.device(map_location)
    except (RuntimeError, TypeError, ValueError):
        raise bad("map_location", map_location, expected) from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise bad("map_location", map_location, "'cpu'", "CUDA is not available on this machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise bad("map_location", map_location, expected,
                      f"this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif device.type != "cpu":
        raise bad("map_location", map_location, expected)
    return str(device)


def _recorded_digests(path: Path) -> dict:
    """``sha256`` and ``fingerprint`` from the JSON beside ``path``, if it has them."""
    sidecar = path.with_suffix(".json")
    if not sidecar.is_file():
        return {}
    try:
        data = json.loads(sidecar.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{sidecar.name}: not valid JSON ({e})") from None
    return {k: data[k] for k in ("sha256", "fingerprint") if isinstance(data, dict) and k in data}


def _verify(path: Path, what: str, found: str, recorded: str, where: str) -> None:
    if found != recorded:
        other = f", or it is not the file {where} describes" if where.endswith(".json") else ""
        raise CheckpointCorruptError(
            f"{path.name}: {what} is {short(found)}..., but {where} recorded {short(recorded)}...: "
            f"the file changed after it was saved (a flipped bit, a partial copy or download, an "
            f"edit){other}. Do not serve it: fetch or save it again.")


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
    copied, and errors name the file and the exact mismatch. Where a digest was
    recorded (see the module's docstring), the file and the weights are checked
    against it, and a mismatch raises :class:`CheckpointCorruptError`.
    """
    path = _check_path(path)
    device = _check_device(map_location)
    if not path.is_file():
        raise CheckpointNotFoundError(f"{path}: checkpoint file not found")
    recorded = _recorded_digests(path)
    if "sha256" in recorded:
        # Before parsing: a corrupt header is then reported as corruption, not as a bad format.
        _verify(path, "its SHA-256", file_sha256(path), recorded["sha256"], path.with_suffix(".json").name)
    try:
        with safe_open(str(path), framework="pt", device=device) as f:
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
    expected = {f"{path.name} metadata": (metadata or {}).get("fingerprint"),
                path.with_suffix(".json").name: recorded.get("fingerprint")}
    found = state_fingerprint(state) if any(expected.values()) else None
    for where, fingerprint in expected.items():
        if fingerprint:
            _verify(path, "the weights' fingerprint", found, fingerprint, where)
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
    path = _check_path(TINY_LM_PATH if path is None else path).with_suffix(".json")
    if not path.is_file():
        raise CheckpointNotFoundError(f"{path}: training record not found")
    return json.loads(path.read_text(encoding="utf-8"))
