"""Numbers the notebooks print read the same on every CPU: ``within`` and the nbval sanitizers."""

import configparser
import re
from pathlib import Path

import pytest

from lessons_lib.compression.evaluate import perplexity_change
from lessons_lib.display import within
from lessons_lib.validate import BadArgument

pytestmark = pytest.mark.lesson00
SANITIZE = Path(__file__).resolve().parent / "nbval_sanitize.cfg"


# Pairs measured on one x86 machine under two kernel sets or batch shapes (issue 12): each pair
# printed differently with a fixed format, and must print the same through ``within``.
@pytest.mark.parametrize("one, other, tol, signed, text", [
    (0.0, 6.0e-08, 1e-6, False, "< 1e-6"),                          # lesson 14: DP vs model(x)
    (9.5e-06, 1.2e-05, 1e-4, False, "< 1e-4"),                      # lesson 12: TP logits
    (-0.00322, -0.00592, 0.1, True, "within ±0.1%"),                # lesson 09: int8 perplexity
    (18.20383, 18.20391, 0.1, True, "+18.2%"),
    (0.39260, 0.39347, 0.1, True, "+0.4%"),
])
def test_values_that_differ_only_by_rounding_print_the_same(one, other, tol, signed, text):
    unit = "%" if signed else ""
    assert within(one, tol, signed=signed, unit=unit) == within(other, tol, signed=signed, unit=unit) == text


@pytest.mark.parametrize("value, tol, kwargs, text", [
    (3.2e-4, 1e-4, {}, "3.2e-4"),                                   # above a tiny tol: 2 significant digits
    (-0.25, 0.1, {"signed": True}, "-0.2"),
    (2.0, 0.5, {"unit": " s"}, "2.0 s"),
    (7.0, 1.0, {}, "7"),
    (float("nan"), 1e-6, {}, "nan"),
    (1e-7, 1e-6, {"signed": True}, "within ±1e-6"),
])
def test_values_at_or_above_the_tolerance_are_rounded_to_its_place(value, tol, kwargs, text):
    assert within(value, tol, **kwargs) == text


def test_a_perplexity_change_reads_in_tenths_of_a_percent():
    assert perplexity_change(1.1244763, 1.1245429) == perplexity_change(1.1245067, 1.1245429) == "within ±0.1%"
    assert perplexity_change(1.3292528, 1.1245429) == "+18.2%"


@pytest.mark.timeout(10)
@pytest.mark.parametrize("tol", [0, -1e-6, float("nan"), float("inf"), "1e-6", None, True])
def test_a_bad_tolerance_is_refused_naming_it(tol):
    with pytest.raises(BadArgument, match=r"tol=.* is not valid"):
        within(0.5, tol)


def _sanitize(text: str) -> str:
    config = configparser.ConfigParser()
    config.read(SANITIZE)
    for section in config.sections():
        text = re.sub(config[section]["regex"], config[section]["replace"], text)
    return text


def test_weight_fingerprints_are_sanitized_and_nothing_else():
    # The two rank-0 fingerprints of lesson 05's table under AVX-512 and under torch's scalar kernels.
    assert _sanitize("| 0 | 2f1166fd3157 | 2f1166fd3157 |") == _sanitize("| 0 | 015f44c13325 | 015f44c13325 |")
    for text in ("bytes 3,420,672", "3280896 | 1.00x", "deadbeefcafe0", "block_2f1166fd3157", "ids 123456789"):
        assert _sanitize(text) == text
