"""After an actor step the write streams (issue 26): each batch's rows become per-shard fragments,
and a shard is assembled as soon as its range is in, while later inputs are still computed; the
bytes equal the plain loop's."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from counterfactory.pipeline.config import load_config
from counterfactory.pipeline.datasink import (
    FRAGMENTS,
    STRAGGLER_LAST_ENV,
    ShardSink,
    assemble_shard,
    write_fragments,
    write_local,
)
from counterfactory.pipeline.runner import local_batches, run_pipeline
from tests.conftest import DEMO

LIMIT, SHARD = 24, 8


def test_actor_path_writes_early_shards_while_the_last_input_is_computed(tmp_path):
    """verify in an actor pool, the batch holding the last input 8 s late: the first shard is on
    disk long before the last one, and the version equals the plain loop's byte for byte."""
    out = tmp_path / "pool"
    env = {**os.environ, STRAGGLER_LAST_ENV: "8", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    r = subprocess.run([sys.executable, "-m", "counterfactory.cli", "run", str(DEMO), f"output.root={out}",
                        f"output.shard_size={SHARD}", "ray.num_cpus=2", "stages.verify.resources.concurrency=1",
                        "--limit", str(LIMIT), "--quiet"], capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    version = out / "demo" / "v1"
    shards = sorted(version.glob("demo-*.tar"))
    assert len(shards) == LIMIT // SHARD
    first, last = shards[0].stat().st_mtime, shards[-1].stat().st_mtime
    assert last - first >= 5, f"the first shard was written {last - first:.1f} s before the last: not streamed"
    assert not list(version.glob(".*")) and not (version / FRAGMENTS).exists()

    local = run_pipeline(load_config(DEMO, [f"output.root={tmp_path / 'local'}", f"output.shard_size={SHARD}"]),
                         limit=LIMIT, local=True)
    assert (version / "manifest.json").read_bytes() == (local.out_dir / "manifest.json").read_bytes()


def _encoded_rows(tmp_path: Path, n: int) -> list[dict[str, np.ndarray]]:
    cfg = load_config(DEMO, [f"output.root={tmp_path / 'x'}"])
    from counterfactory.pipeline.inputs import plan_inputs

    return list(local_batches(cfg, plan_inputs(cfg, n), batch_size=5))


def test_fragments_cut_anyhow_assemble_to_the_plain_loops_shards(tmp_path):
    """Batches in any order and any cut, one of them written twice (a retry) and one cut
    otherwise: every shard assembled from its fragments equals the plain loop's, byte for byte."""
    n = 12
    batches = _encoded_rows(tmp_path, n)
    whole = {c: np.concatenate([b[c] for b in batches]) for c in batches[0]}
    ref = ShardSink(str(tmp_path / "ref"), "d", 5, n)
    Path(ref.out_dir).mkdir()
    ref_entries = {e["k"]: e for e in write_local(iter(batches), ref)}

    sink = ShardSink(str(tmp_path / "frag"), "d", 5, n)
    Path(sink.out_dir).mkdir()
    rng = np.random.default_rng(3)
    perm = rng.permutation(n)
    cuts = [perm[:4], perm[4:9], perm[9:], perm[2:7]]  # the last: a batch retried with another cut
    frags: dict[int, set[tuple[int, int]]] = {}
    for rows in cuts:
        meta = write_fragments({c: v[rows] for c, v in whole.items()}, sink=sink)
        for k, first, m in zip(meta["k"].tolist(), meta["first"].tolist(), meta["n"].tolist(), strict=True):
            frags.setdefault(k, set()).add((first, m))
    for k in sorted(frags):
        entry = assemble_shard(k, sorted(frags[k]), sink)
        assert entry == ref_entries[k]
        assert (Path(sink.out_dir) / entry["shard"]["name"]).read_bytes() == \
            (Path(ref.out_dir) / entry["shard"]["name"]).read_bytes()


def test_a_missing_input_is_never_assembled_around(tmp_path):
    batches = _encoded_rows(tmp_path, 6)
    whole = {c: np.concatenate([b[c] for b in batches]) for c in batches[0]}
    sink = ShardSink(str(tmp_path / "frag"), "d", 6, 6)
    Path(sink.out_dir).mkdir()
    meta = write_fragments({c: v[[0, 1, 2, 4, 5]] for c, v in whole.items()}, sink=sink)
    with pytest.raises(RuntimeError, match="input 3 is in none of its fragments"):
        assemble_shard(0, [(int(meta["first"][0]), int(meta["n"][0]))], sink)
