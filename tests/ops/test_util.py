"""Tests for jfcnn.ops._util, the argument checks the ops share."""

import numpy as np
import pytest

from jfcnn.ops._util import check_int, pair


@pytest.mark.parametrize(
    "value, expected",
    [
        (3, (3, 3)),
        (np.int64(2), (2, 2)),
        (np.array(5), (5, 5)),
        ((2, 7), (2, 7)),
        ([1, 4], (1, 4)),
        (np.array([4, 8]), (4, 8)),
        ((np.int32(0), 6), (0, 6)),
    ],
)
def test_pair_values(value, expected):
    result = pair(value, "size")
    assert result == expected
    assert all(type(v) is int for v in result)


@pytest.mark.parametrize("value", [2.0, True, (1, True), (1, 2, 3), (1,), (1.0, 2), "ab", None])
def test_pair_rejects_non_ints_naming_the_argument(value):
    with pytest.raises(ValueError, match=r"^grid_size must be an int or a pair of ints, got "):
        pair(value, "grid_size")


def test_pair_minimum():
    assert pair((0, 3), "padding", minimum=0) == (0, 3)
    with pytest.raises(ValueError, match=r"^padding must be >= 0, got \(0, -2\)$"):
        pair((0, -2), "padding", minimum=0)
    with pytest.raises(ValueError, match=r"^strides must be >= 1, got 0$"):
        pair(0, "strides", minimum=1)


def test_check_int():
    assert check_int("sampling_ratio", np.int8(-1)) == -1
    for bad in (2.0, True, "2"):
        with pytest.raises(TypeError, match="sampling_ratio must be an int"):
            check_int("sampling_ratio", bad)
