"""The one validation helper: every kind of bad value is refused with the same wording."""

import math

import pytest
import torch

from lessons_lib.validate import (BadArgument, check_choice, check_int, check_probability, check_real,
                                  check_str_list, check_token_ids)

pytestmark = pytest.mark.lesson00


@pytest.mark.parametrize("value", [True, 1.0, "3", None, -1, 11])
def test_check_int_refuses_non_counts(value):
    with pytest.raises(BadArgument, match=r"^n=.* is not valid: expected an int in \[0, 10\]"):
        check_int("n", value, low=0, high=10)


def test_bad_argument_is_both_value_and_type_error():
    assert issubclass(BadArgument, ValueError) and issubclass(BadArgument, TypeError)
    assert check_int("n", 3, low=0) == 3


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, False, "0.5", 1.5, -0.1])
def test_check_probability_refuses_nan_inf_bool_and_out_of_range(value):
    with pytest.raises(BadArgument, match=r"^p=.* is not valid"):
        check_probability("p", value)


def test_check_real_allows_inf_only_when_asked():
    assert check_real("t", math.inf, low=0, low_open=True, allow_inf=True) == math.inf
    with pytest.raises(BadArgument, match="NaN"):
        check_real("t", math.nan, allow_inf=True)
    with pytest.raises(BadArgument, match=r"expected a finite number > 0"):
        check_real("t", 0, low=0, low_open=True)


def test_check_choice_and_str_list():
    assert check_choice("mode", "a", ["a", "b"]) == "a"
    with pytest.raises(BadArgument, match=r"mode='c' is not valid: expected one of 'a', 'b'"):
        check_choice("mode", "c", ["a", "b"])
    with pytest.raises(BadArgument, match=r"scopes='generate'.*wrap it"):
        check_str_list("scopes", "generate")
    assert check_str_list("scopes", ("a", "b")) == ["a", "b"]


@pytest.mark.parametrize("ids, why", [
    (torch.tensor([[1.0, 2.0]]), "float"),
    (torch.tensor([[True, False]]), "bool"),
    (torch.tensor([[1, 300]]), "from 1 to 300"),
    (torch.tensor([[-1, 3]]), "from -1 to 3"),
    (torch.zeros(1, 0, dtype=torch.long), "no tokens"),
    ([1, True], "True"),
    ("hello", "text"),
])
def test_check_token_ids(ids, why):
    with pytest.raises(BadArgument, match=why):
        check_token_ids("input_ids", ids, 256)
