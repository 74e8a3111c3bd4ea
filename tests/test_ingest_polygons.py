"""ingest's polygon check: JSON's common points take a C-level pass (issue 27, s27encode), every
other input the full per-number check, with the same verdicts."""

from __future__ import annotations

import pytest

from counterfactory.sample import Reject
from counterfactory.stages.ingest import _finite, _is_polygon, check_objects


def _full(p) -> bool:  # the check as it reads, number by number
    return isinstance(p, list) and all(isinstance(q, list | tuple) and len(q) == 2 and _finite(q[0]) and _finite(q[1])
                                       for q in p)


@pytest.mark.parametrize("p", [
    [], [[1.0, 2.5], [3, 4]], [(1.0, 2.0)], [[1.0, 2.0], (3, 4)],
    [[True, 1.0]], [[1.0, None]], [["1", 2.0]], [[1.0, 2.0, 3.0]], [[1.0]], [1.0, 2.0],
    [[float("nan"), 1.0]], [[1.0, float("inf")]], [[-float("inf"), 0]],
    [[10 ** 400, 1.0]], [[2 ** 1024, 0]], [[1e308, -1e308]],  # ints too large for a float
    ((1.0, 2.0),), "xy", None, [[[1.0, 2.0]]],
])
def test_polygon_verdicts_equal_the_full_check(p):
    assert _is_polygon(p) == _full(p)


def test_a_huge_int_coordinate_is_a_bad_polygon_not_a_crash():
    with pytest.raises(Reject, match="bad_polygon"):
        check_objects([{"category": "x", "polygon": [[0.0, 0.0], [10 ** 400, 1.0], [2.0, 3.0]]}], 10)
    check_objects([{"category": "x", "polygon": [[0.0, 0.0], [4, 1.5], [2.0, 3.0]]}], 10)
