"""One way to refuse a bad argument, used by every public entry point of the library.

Each helper checks one kind of value, returns it (normalised where that is safe) and, when it is
wrong, raises :class:`BadArgument` with the same wording everywhere::

    max_new_tokens=True is not valid: expected an int >= 0 (a bool is not a count)

``BadArgument`` is both a ``ValueError`` and a ``TypeError``, so code that catches either, as
Python's own conventions suggest for a wrong value or a wrong type, catches it.

The rules the helpers share:
- ``bool`` is never a number: ``True`` is not the count 1 and not the probability 1.0.
- NaN is refused wherever a number is compared (a NaN passes every ``<`` test by failing it).
- infinity is refused unless the caller says it means something (``allow_inf=True``).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable

import torch

__all__ = ["BadArgument", "bad", "check_int", "check_real", "check_probability", "check_choice",
           "check_str", "check_str_list", "check_tensor", "check_token_ids"]


class BadArgument(ValueError, TypeError):
    """A public function was given an argument it cannot use; the message names it."""


def bad(name: str, value, expected: str, why: str = "") -> BadArgument:
    """The library's one wording for a bad argument: ``name=value is not valid: expected ...``."""
    shown = repr(value)
    if len(shown) > 80:
        shown = shown[:77] + "..."
    reason = f" ({why})" if why else ""
    return BadArgument(f"{name}={shown} is not valid: expected {expected}{reason}")


def _bounds(low, high, low_open: bool = False, high_open: bool = False) -> str:
    if low is not None and high is not None:
        left, right = "(" if low_open else "[", ")" if high_open else "]"
        return f" in {left}{low}, {high}{right}"
    if low is not None:
        return f" {'>' if low_open else '>='} {low}"
    if high is not None:
        return f" {'<' if high_open else '<='} {high}"
    return ""


def check_int(name: str, value, *, low: int | None = None, high: int | None = None,
              why: str = "") -> int:
    """``value`` as an ``int`` in ``[low, high]`` (either bound may be None)."""
    expected = "an int" + _bounds(low, high)
    if isinstance(value, bool):
        raise bad(name, value, expected, why or "a bool is not a count")
    if not isinstance(value, numbers.Integral):
        raise bad(name, value, expected, why or f"got a {type(value).__name__}")
    value = int(value)
    if (low is not None and value < low) or (high is not None and value > high):
        raise bad(name, value, expected, why)
    return value


def check_real(name: str, value, *, low: float | None = None, high: float | None = None,
               low_open: bool = False, high_open: bool = False, allow_inf: bool = False,
               why: str = "") -> float:
    """``value`` as a finite ``float`` in ``[low, high]``; ``low_open``/``high_open`` exclude an end."""
    expected = ("a number" if allow_inf else "a finite number") + _bounds(low, high, low_open, high_open)
    if isinstance(value, bool):
        raise bad(name, value, expected, why or "a bool is not a number")
    if not isinstance(value, numbers.Real):
        raise bad(name, value, expected, why or f"got a {type(value).__name__}")
    value = float(value)
    if math.isnan(value):
        raise bad(name, value, expected, why or "NaN compares false with everything")
    if math.isinf(value) and not allow_inf:
        raise bad(name, value, expected, why)
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and (value >= high if high_open else value > high)
    if too_low or too_high:
        raise bad(name, value, expected, why)
    return value


def check_probability(name: str, value, why: str = "") -> float:
    """``value`` as a float in ``[0, 1]``."""
    return check_real(name, value, low=0.0, high=1.0, why=why)


def check_choice(name: str, value, choices: Iterable, why: str = ""):
    """``value`` if it is one of ``choices``."""
    choices = list(choices)
    try:
        ok = value in choices
    except TypeError:
        ok = False
    if not ok:
        raise bad(name, value, "one of " + ", ".join(repr(c) for c in choices), why)
    return value


def check_str(name: str, value, *, allow_empty: bool = False, why: str = "") -> str:
    """``value`` if it is a ``str`` (non-empty unless ``allow_empty``)."""
    expected = "a string" if allow_empty else "a non-empty string"
    if not isinstance(value, str) or (not value and not allow_empty):
        raise bad(name, value, expected, why)
    return value


def check_str_list(name: str, value, *, allow_empty: bool = False, why: str = "") -> list[str]:
    """``value`` as a list of non-empty strings; a bare string is refused (it is not a list of its letters)."""
    expected = "a list of non-empty strings" + ("" if allow_empty else " (at least one)")
    if isinstance(value, (str, bytes)):
        raise bad(name, value, expected, why or f"a single string would be read as {len(value)} one-letter items; "
                                               f"wrap it: [{value!r}]")
    try:
        items = list(value)
    except TypeError:
        raise bad(name, value, expected, why) from None
    if (not items and not allow_empty) or not all(isinstance(s, str) and s for s in items):
        raise bad(name, value, expected, why)
    return items


def check_tensor(name: str, value, *, min_dim: int = 0, why: str = "") -> torch.Tensor:
    """``value`` if it is a ``torch.Tensor`` with at least ``min_dim`` dimensions."""
    expected = "a torch.Tensor" + (f" with at least {min_dim} dimension{'s' * (min_dim > 1)}" if min_dim else "")
    if not isinstance(value, torch.Tensor):
        raise bad(name, value, expected, why or f"got a {type(value).__name__}")
    if value.dim() < min_dim:
        raise bad(name, value, expected, why or f"got shape {tuple(value.shape)}")
    return value


def check_token_ids(name: str, ids, vocab_size: int, *, allow_empty: bool = False):
    """``ids`` (a tensor or a sequence of ints) if every id is an integer in ``[0, vocab_size)``.

    Returns the ids unchanged. A float or bool tensor is refused, not cast: a learner who passes
    logits or a mask where ids belong should hear about it.
    """
    expected = f"integer token ids in [0, {vocab_size})"
    if isinstance(ids, torch.Tensor):
        if ids.dtype == torch.bool or ids.is_floating_point() or ids.is_complex():
            raise bad(name, ids, expected, f"got a {ids.dtype} tensor")
        if ids.numel() == 0:
            if allow_empty:
                return ids
            raise bad(name, ids, expected, "no tokens: a prompt needs at least one")
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= vocab_size:
            raise bad(name, f"tensor with ids from {lo} to {hi}", expected)
        return ids
    if isinstance(ids, (str, bytes)):
        raise bad(name, ids, expected, "got text: encode it with the tokenizer first")
    try:
        items = list(ids)
    except TypeError:
        raise bad(name, ids, expected) from None
    if not items and not allow_empty:
        raise bad(name, ids, expected, "no tokens: a prompt needs at least one")
    for i in items:
        if isinstance(i, bool) or not isinstance(i, numbers.Integral) or not 0 <= i < vocab_size:
            raise bad(name, ids, expected, f"the id {i!r} is not one")
    return ids
