"""Redacting personal data (PII) from prompts and logs before they are stored or shipped.

Prompts are user data; logs and traces copy them into places with wider access and longer
retention than the request itself. So redact on the way in (before the prompt is logged) and in
the logging pipeline (a ``logging.Filter``), and never rely on one of the two alone.

Patterns covered: e-mail addresses, phone numbers, payment card numbers (13-19 digits that pass
the **Luhn** check, so a mistyped or random digit run is not labelled a card), IPv4 and simple IPv6 addresses. Regexes are
a first line only: names and addresses need an NER model, and nothing catches everything. A known
gap: a phone number written right after or before another number ("020 7946 0958 1234 5678")
reads as one number of more than 15 digits and is kept, as a mistyped card is.
"""

from __future__ import annotations

import logging
import re
from bisect import bisect_left, bisect_right
from itertools import accumulate

from ..validate import check_str

# Linear time, even on a long run of address characters with no "@": the local part may only
# start where a run of such characters starts (the lookbehind), and the possessive ``++`` never
# gives characters back, so each character is scanned a bounded number of times. The naive
# ``[..]+@`` restarted at every position of the run and took 13 s on 160,000 letters. Lengths
# are not capped at RFC 5321's 64 and 63: a cap would let an over-long address through whole.
EMAIL = re.compile(r"(?<![A-Za-z0-9._%+-])[A-Za-z0-9._%+-]++@(?:[A-Za-z0-9-]++\.)+[A-Za-z]{2,}+")
# Where card numbers are looked for: a run of digit groups joined by single spaces or dashes.
# The card is then any Luhn-valid span of whole groups (see _cards), not only the whole run: a
# card written next to a quantity, an expiry date or a CVV ("4111 1111 1111 1111 123") is a run
# that fails Luhn as a whole, and a pattern that took the whole run let the card through.
DIGIT_RUN = re.compile(r"(?<!\d)\d++(?:[ -]\d++)*+")
_GROUP = re.compile(r"\d+")
CARD_DIGITS = (13, 19)
# Not inside a longer dotted number (a version string), but a sentence's full stop may follow.
IPV4 = re.compile(r"(?<![\d.])(?:(?:25[0-5]|2[0-4]\d|1?\d?\d)\.){3}(?:25[0-5]|2[0-4]\d|1?\d?\d)(?!\d|\.\d)")
IPV6 = re.compile(r"(?<![\w:])(?:[0-9A-Fa-f]{1,4}:){7}[0-9A-Fa-f]{1,4}(?![\w:])")
PHONE = re.compile(r"(?<![\w+])(?:\+\d{1,3}[ .-]?)?(?:\(\d{1,4}\)[ .-]?)?\d{2,4}(?:[ .-]?\d{2,4}){2,4}(?!\w)")


def luhn_valid(number: str) -> bool:
    """The Luhn checksum every payment card number satisfies (spaces and dashes ignored).

    From the rightmost digit, double every second digit (subtract 9 if that exceeds 9); the
    total must be a multiple of 10. It catches every single-digit typo.
    """
    digits = [c for c in str(number) if c not in " -"]
    if not digits or not all(c.isdigit() for c in digits):
        return False
    total = 0
    for i, c in enumerate(reversed(digits)):
        d = int(c)
        if i % 2 == 1:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


# Luhn's doubled digit, 9 subtracted when it exceeds 9.
_DOUBLED = (0, 2, 4, 6, 8, 1, 3, 5, 7, 9)


def _luhn_sums(digits: str) -> tuple[list[int], list[int]]:
    """Prefix sums of the Luhn terms for either parity, so any span's checksum costs O(1).

    ``sums[p][k]`` adds the first ``k`` digits, doubling those whose index has parity ``1 - p``:
    a span ending at index ``e`` leaves its last digit undoubled when read with ``p = e % 2``.
    """
    even, odd = [0], [0]
    for i, c in enumerate(digits):
        d = ord(c) - 48
        even.append(even[-1] + (d if i % 2 == 0 else _DOUBLED[d]))
        odd.append(odd[-1] + (_DOUBLED[d] if i % 2 == 0 else d))
    return even, odd


def _cards(m: re.Match) -> str:
    """Replace the Luhn-valid spans of whole groups with 13-19 digits, leftmost and longest first."""
    run = m.group()
    groups = [g.span() for g in _GROUP.finditer(run)]
    starts = list(accumulate((b - a for a, b in groups), initial=0))   # digits before group k
    if starts[-1] < CARD_DIGITS[0]:
        return run
    sums = _luhn_sums("".join(run[a:b] for a, b in groups))
    out, last, i = [], 0, 0
    while i < len(groups):
        # A span from group i up to (not including) group k has starts[k] - starts[i] digits.
        ks = range(bisect_left(starts, starts[i] + CARD_DIGITS[0]),
                   bisect_right(starts, starts[i] + CARD_DIGITS[1]))
        valid = [k for k in ks if (sums[(starts[k] - 1) % 2][starts[k]]
                                   - sums[(starts[k] - 1) % 2][starts[i]]) % 10 == 0]
        if valid:
            out += [run[last:groups[i][0]], "[CARD]"]
            last, i = groups[valid[-1] - 1][1], valid[-1]
        else:
            i += 1
    return "".join(out) + run[last:]


def _phones(m: re.Match) -> str:
    digits = sum(c.isdigit() for c in m.group())
    return "[PHONE]" if 7 <= digits <= 15 else m.group()


def redact(text: str) -> str:
    """Replace PII in ``text`` with ``[EMAIL]``, ``[CARD]``, ``[IP]``, ``[PHONE]``.

    Order matters: cards before phones (a card is a long digit run a phone pattern would also
    take), IP addresses before phones (dotted digits).
    """
    check_str("text", text, allow_empty=True)
    text = EMAIL.sub("[EMAIL]", text)
    text = DIGIT_RUN.sub(_cards, text)
    text = IPV4.sub("[IP]", text)
    text = IPV6.sub("[IP]", text)
    return PHONE.sub(_phones, text)


class RedactingFilter(logging.Filter):
    """A logging filter that redacts the formatted message before any handler sees it.

    The traceback of ``logger.exception`` and the stack of ``stack_info=True`` are formatted by
    the handler *after* the filters have run, and exception messages quote user data as readily
    as log messages do. So the filter formats the traceback itself, redacts it, and drops the
    live ``exc_info``, leaving handlers only redacted text to print.

    A filter added to a logger sees only records logged through that logger; to cover records
    propagated from child loggers, add it to the handler instead.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = redact(record.getMessage())
        record.args = None
        if record.exc_info:
            if not record.exc_text:
                record.exc_text = logging.Formatter().formatException(record.exc_info)
            record.exc_info = None
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        return True
