"""What runs after the stream, in CPU time (issue 27, "the run is spent in the stream").

One plain-loop run (``local=True``: the floor, one process) of the bench's procedural set, with
this process's CPU time split at the stream's end (``summary.json``'s ``driver_cpu_seconds``:
first shard to manifest, the stages included), the shortcut audit at publish timed on its own
(CPU seconds, and how much it raised the peak RSS: ``ru_maxrss`` before and after it), and, where
the audit's image statistics are computed in the stream (``audit_features.AuditCollector``), their
CPU cost per sampled sample. Prints one line; ``--profile`` adds a cProfile of what runs after the
stream (top entries by cumulative time). ``--records VERSION_DIR``: ``sample_record`` alone (what
the writers run per sampled sample) on a published version's shards, best of ``--reps`` passes.

Usage: python bench/audit_cost.py [--n 1000] [--profile] | --records VERSION_DIR [--reps 3]
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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--records", default=None, help="time sample_record alone on this published version's shards")
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    print(records(args.records, args.reps) if args.records else measure(args.n, args.profile))


if __name__ == "__main__":
    main()
