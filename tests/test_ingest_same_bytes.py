"""ingest with less Python per input, the same results (issue 27, s27encode): the polygon check
takes a C-level pass over JSON's common points (every other input the full per-number check,
same verdicts); a procedural scene's spec is computed once for the reader and ingest."""

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


def test_a_kept_scene_spec_is_a_fresh_equal_dict():
    """scenes.scene_spec keeps recent specs as JSON text (the reader and ingest both ask): a hit
    is equal to a fresh computation and never the object another caller holds."""
    from counterfactory import scenes

    scenes._spec_json.cache_clear()
    a = scenes.scene_spec(5, 11, (160, 128))
    a["objects"].clear()  # a caller's change never reaches the next one
    b = scenes.scene_spec(5, 11, (160, 128))
    assert scenes._spec_json.cache_info().hits == 1
    assert b == scenes._make_spec(5, 11, (160, 128)) and b["objects"]
    with pytest.raises(ValueError, match="too small"):
        scenes.scene_spec(5, 11, (16, 16))
