"""Checkers for notebook 08 (security and privacy)."""

from .check import Incorrect, exercise

_CASES = [
    ("79927398713", True), ("79927398710", False), ("4111111111111111", True), ("4111111111111112", False),
    ("4111 1111 1111 1111", True), ("5500-0000-0000-0004", True), ("378282246310005", True),
    ("6011111111111117", True), ("6011111111111118", False), ("0", True), ("18", True), ("81", False),
    ("", False), ("4111a11111111111", False), ("1234567812345678", False), ("1234567812345670", True),
]


@exercise("08.luhn", "the Luhn checksum of card numbers")
def check_luhn(candidate):
    for number, expected in _CASES:
        got = candidate(number)
        if not isinstance(got, bool):
            raise Incorrect(f"luhn_valid({number!r}) returned {got!r}; return True or False")
        if got != expected:
            hint = ""
            if number in ("", "4111a11111111111"):
                hint = " A string with no digits, or with letters, is not a valid number."
            elif " " in number or "-" in number:
                hint = " Ignore spaces and dashes."
            else:
                hint = (" Double every SECOND digit counting from the RIGHT (the check digit is not "
                        "doubled), subtract 9 from doubles above 9, and test the sum modulo 10.")
            raise Incorrect(f"luhn_valid({number!r}) should be {expected}, got {got}.{hint}")
    return f"all {len(_CASES)} numbers classified correctly"
