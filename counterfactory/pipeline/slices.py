"""The input plan's slices, compact (issue 26: planning at scale).

A slice is a few consecutive input records (a manifest byte range, a run of procedural scenes,
COCO records carried inline). The planner used to keep one dict per slice, each with the input's
shared fields written out (~1 KB: 1.2 GB for a 10-million-line manifest). ``SliceTable`` keeps
the shared fields once per input and the per-slice numbers in ``array`` columns (~76 bytes a
slice), and makes a slice's dict only when one is asked for, on the worker that reads it:
indexing gives a dict, a range of positions gives a ``SliceTable`` of those slices alone (what a
shard task carries), iteration gives dicts.
"""

from __future__ import annotations

import bisect
from array import array
from collections.abc import Iterator, Sequence
from typing import Any

COLUMNS = ("idx0", "n", "units", "first", "start", "end", "lineno")
DIGEST = 16  # bytes of a manifest slice's blake2b (``inputs._seal``)


class SliceTable(Sequence):
    """Slices in ``idx0`` order. ``open(base, uses, **cols)`` starts a slice of the input whose
    shared fields are ``base`` (kept once; ``uses`` names the optional columns its slices have),
    ``grow`` adds to the last one."""

    def __init__(self) -> None:
        self.bases: list[tuple[dict[str, Any], tuple[str, ...]]] = []
        self.base_of = array("l")
        self.cols = {c: array("q") for c in COLUMNS}
        self.digests = bytearray()  # DIGEST bytes per slice (zeros: not a manifest slice)
        self.inline: dict[int, list[dict[str, Any]]] = {}  # position -> records carried (COCO)

    def __len__(self) -> int:
        return len(self.base_of)

    def open(self, base: dict[str, Any], uses: tuple[str, ...], inline: bool = False, **cols: int) -> int:
        if not self.bases or self.bases[-1][0] is not base:
            self.bases.append((base, uses))
        self.base_of.append(len(self.bases) - 1)
        for c in COLUMNS:
            self.cols[c].append(cols.get(c, 0))
        self.digests += bytes(DIGEST)
        if inline:
            self.inline[len(self) - 1] = []
        return len(self) - 1

    def set(self, i: int, col: str, value: int) -> None:
        self.cols[col][i] = value

    def seal(self, i: int, digest: bytes) -> None:
        self.digests[i * DIGEST:(i + 1) * DIGEST] = digest

    def idx0(self) -> Sequence[int]:
        return self.cols["idx0"]

    def position(self, idx: int) -> int:
        """The position of the slice holding input ``idx`` (0 when before the first)."""
        return max(0, bisect.bisect_right(self.cols["idx0"], idx) - 1)

    def _dict(self, i: int) -> dict[str, Any]:
        base, uses = self.bases[self.base_of[i]]
        sl: dict[str, Any] = {"idx0": self.cols["idx0"][i], "n": self.cols["n"][i], "units": self.cols["units"][i]}
        for c in uses:
            sl[c] = self.cols[c][i]
        if "start" in uses:
            sl["blake2b"] = bytes(self.digests[i * DIGEST:(i + 1) * DIGEST]).hex()
        if i in self.inline:
            sl["records"] = self.inline[i]
        sl.update(base)
        return sl

    def view(self, a: int, b: int) -> SliceTable:
        """Slices ``[a, b)`` alone: a small table (their bases and numbers only)."""
        out = SliceTable()
        a, b = max(0, a), max(a, min(b, len(self)))
        used = sorted(set(self.base_of[a:b]))
        out.bases = [self.bases[j] for j in used]
        renum = {j: n for n, j in enumerate(used)}
        out.base_of = array("l", (renum[j] for j in self.base_of[a:b]))
        out.cols = {c: self.cols[c][a:b] for c in COLUMNS}
        out.digests = self.digests[a * DIGEST:b * DIGEST]
        out.inline = {i - a: recs for i, recs in self.inline.items() if a <= i < b}
        return out

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            a, b, step = i.indices(len(self))
            if step != 1:
                raise ValueError("a slice table is cut in steps of 1")
            return self.view(a, b)
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        return self._dict(i)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return (self._dict(i) for i in range(len(self)))
