"""What runs after the stream, in CPU time (issue 27, "the run is spent in the stream").

One plain-loop run (``local=True``: the floor, one process) of the bench's procedural set, with
this process's CPU time split at the stream's end (``summary.json``'s ``driver_cpu_seconds``:
first shard to manifest, the stages included), the shortcut audit at publish timed on its own
(CPU seconds, and how much it raised the peak RSS: ``ru_maxrss`` before and after it), and, where
the audit's image statistics are computed in the stream (``audit_features.AuditCollector``), their
CPU cost per sampled sample. Prints one line; ``--profile`` adds a cProfile of what runs after the
stream (top entries by cumulative time). ``--records VERSION_DIR``: ``sample_record`` alone (what
the writers run per sampled sample) on a published version's shards, best of ``--reps`` passes;
with ``--against OLD_TREE`` both trees' ``audit_features`` are loaded into this process and run
in turn on each sample (order alternating), so a load that changes by the second, as on a shared
machine, falls on both alike: two separate runs at the same time differed by up to 40 % there.

Usage: python bench/audit_cost.py [--n 1000] [--profile] | --records VERSION_DIR [--reps 3] [--against OLD_TREE]
Run two commits back to back under the same load: copy this file into the old commit's
worktree (it imports the counterfactory of the tree it sits in).
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import run as bench_run  # noqa: E402

from counterfactory import audit  # noqa: E402
from counterfactory.pipeline import runner  # noqa: E402


def _maxrss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(n: int, profile: bool = False) -> str:
    spent = {"audit_cpu": 0.0, "rss_before": 0.0, "rss_after": 0.0, "stream_cpu": 0.0, "sampled": 0}
    real_audit = audit.audit_version

    def timed_audit(*a, **k):
        spent["rss_before"] = _maxrss_mib()
        c0 = time.process_time()
        try:
            return real_audit(*a, **k)
        finally:
            spent["audit_cpu"] += time.process_time() - c0
            spent["rss_after"] = _maxrss_mib()

    audit.audit_version = timed_audit
    try:  # the in-stream statistics, where this commit has them
        from counterfactory.audit_features import AuditCollector

        real_add = AuditCollector.add

        def timed_add(self, key, parts):
            c0 = time.thread_time()  # the plain loop runs its steps in threads: this one's CPU only
            before = len(self.records)
            real_add(self, key, parts)
            spent["stream_cpu"] += time.thread_time() - c0
            spent["sampled"] += len(self.records) - before

        AuditCollector.add = timed_add
    except ImportError:
        pass
    prof = cProfile.Profile() if profile else None
    after_start = {}
    real_publish = runner.publish_version

    def profiled_publish(*a, **k):  # the card (and the audit in it) runs inside publish
        after_start["cpu"] = time.process_time()
        if prof is not None:
            prof.enable()
        try:
            return real_publish(*a, **k)
        finally:
            if prof is not None:
                prof.disable()
            after_start["publish_cpu"] = time.process_time() - after_start["cpu"]

    runner.publish_version = profiled_publish
    tmp = Path(tempfile.mkdtemp(prefix="cf-audit-cost-"))
    try:
        cfg = bench_run.scenes_config(n, tmp)
        with bench_run.PeakRSS() as mem:
            c0 = time.process_time()
            res = runner.run_pipeline(cfg, local=True, progress=False)
            cpu = time.process_time() - c0
        summary = json.loads((res.out_dir / "summary.json").read_text())
        card = json.loads((res.out_dir / "card.json").read_text())
        info = json.loads((res.out_dir / "version.json").read_text())
        stream = summary["pipeline"]["driver_cpu_seconds"]
        s = res.manifest["counts"]["samples"]
        a = card["audit"]
        aucs = {v: d.get("auc") for v, d in sorted(a["detectability"].items())}
        per = f"{1000 * spent['stream_cpu'] / spent['sampled']:.1f} CPU ms per sampled sample" if spent["sampled"] else "-"
        line = (f"N={n}: {s} pairs; CPU {cpu:.1f} s: stream {stream:.1f} s, outside it {cpu - stream:.1f} s "
                f"({100 * (cpu - stream) / cpu:.1f} %; publish+card {after_start.get('publish_cpu', 0):.1f} s, audit "
                f"{spent['audit_cpu']:.1f} s); audit in the stream {spent['stream_cpu']:.1f} s over {spent['sampled']} "
                f"sampled samples ({per}); audited {a['sample']['audited']}; peak RSS {mem.peak / 2**20:.0f} MiB "
                f"(ru_maxrss {spent['rss_before']:.0f} MiB before the audit, {spent['rss_after']:.0f} after); "
                f"content id {info['content_id'][:16]}; probe AUC {json.dumps(aucs)}")
        if prof is not None:
            pstats.Stats(prof).sort_stats("cumulative").print_stats(30)
        return line
    finally:
        audit.audit_version = real_audit
        runner.publish_version = real_publish
        shutil.rmtree(tmp, ignore_errors=True)


def records(vdir: str, reps: int = 3) -> str:
    """The in-stream statistics alone: ``sample_record`` on the sampled samples of a published
    version's shards (read once, in memory), the best of ``reps`` passes in CPU ms per sampled
    sample, and a digest of the window rows and covers (same digest = same numbers)."""
    import hashlib

    from counterfactory import audit_features as af
    from counterfactory.shards import read_shard, resolve_shards

    manifest = json.loads((Path(vdir) / "manifest.json").read_text())
    sample = af.AuditSample(seed=0, sample_pairs=256, n_inputs=manifest["counts"]["inputs"], grid=8, abstain="unknown")
    shards, _ = resolve_shards(vdir)
    samples = [smp for sh in shards for smp in read_shard(sh) if sample.wants(smp["__key__"])]
    best = float("inf")
    for _ in range(reps):
        c0 = time.process_time()
        recs = [af.sample_record(smp["__key__"], smp["json"], smp, sample.grid, sample.abstain) for smp in samples]
        best = min(best, time.process_time() - c0)
    h = hashlib.sha256()
    for r in recs:
        h.update(b"" if r["orig_win"] is None else r["orig_win"].tobytes())
        for p in r["pairs"]:
            h.update(p["v"].encode() + p["cf_win"].tobytes() + (b"" if p["cover"] is None else p["cover"].tobytes()))
    images = sum(r["images"] for r in recs)
    return (f"sample_record on {len(samples)} sampled samples ({images / len(samples):.1f} images each): "
            f"{1000 * best / len(samples):.2f} CPU ms per sampled sample (best of {reps}); digest {h.hexdigest()[:16]}")


def records_against(vdir: str, old_tree: str, reps: int = 3) -> str:
    """``sample_record`` of this tree and of ``old_tree`` (its ``counterfactory/audit_features.py``,
    loaded under another module name; what it imports comes from this tree) on the same sampled
    samples, interleaved per sample, ``reps`` rounds: CPU ms per sampled sample of each, and
    whether their records are the same numbers."""
    import importlib.util

    import numpy as np

    from counterfactory import audit_features as af
    from counterfactory.shards import read_shard, resolve_shards

    spec = importlib.util.spec_from_file_location(
        "audit_features_old", Path(old_tree) / "counterfactory" / "audit_features.py")
    old = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = old  # dataclasses look their module up
    spec.loader.exec_module(old)
    manifest = json.loads((Path(vdir) / "manifest.json").read_text())
    sample = af.AuditSample(seed=0, sample_pairs=256, n_inputs=manifest["counts"]["inputs"], grid=8, abstain="unknown")
    shards, _ = resolve_shards(vdir)
    samples = [smp for sh in shards for smp in read_shard(sh) if sample.wants(smp["__key__"])]
    spent = {"old": 0.0, "new": 0.0}
    same = True
    for rnd in range(reps):
        for i, smp in enumerate(samples):
            got = {}
            for name, mod in (("old", old), ("new", af)) if (i + rnd) % 2 == 0 else (("new", af), ("old", old)):
                c0 = time.process_time()
                got[name] = mod.sample_record(smp["__key__"], smp["json"], smp, sample.grid, sample.abstain)
                spent[name] += time.process_time() - c0
            a, b = got["old"], got["new"]
            same = same and np.array_equal(a["orig_win"], b["orig_win"]) and all(
                p["v"] == q["v"] and np.array_equal(p["cf_win"], q["cf_win"]) and np.array_equal(p["cover"], q["cover"])
                for p, q in zip(a["pairs"], b["pairs"], strict=True))
    per = {k: 1000 * v / (reps * len(samples)) for k, v in spent.items()}
    return (f"sample_record on {len(samples)} sampled samples x {reps}, interleaved per sample: {old_tree} "
            f"{per['old']:.2f}, this tree {per['new']:.2f} CPU ms per sampled sample ({100 * (per['new'] / per['old'] - 1):+.1f} %); "
            f"records {'bit-identical' if same else 'DIFFER'}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--records", default=None, help="time sample_record alone on this published version's shards")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--against", default=None, help="with --records: another tree, run interleaved per sample")
    args = ap.parse_args()
    if args.records and args.against:
        print(records_against(args.records, args.against, args.reps))
    else:
        print(records(args.records, args.reps) if args.records else measure(args.n, args.profile))


if __name__ == "__main__":
    main()
