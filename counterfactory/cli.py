"""Command line: ``counterfactory run CONFIG [dotted.key=value ...] [--limit N] [--dry-run]``."""

from __future__ import annotations

import argparse
import sys

import yaml

from counterfactory.pipeline.config import ConfigError, load_config


def _print_plan(cfg, n_inputs: int) -> None:
    from rich.console import Console
    from rich.table import Table

    from counterfactory.pipeline.runner import stage_plan

    con = Console()
    con.print(yaml.safe_dump(cfg.resolved(), sort_keys=False))
    t = Table(title=f"stage plan ({n_inputs} inputs)")
    for col in ("stage", "backend", "runs as", "num_cpus", "num_gpus", "concurrency", "batch_size"):
        t.add_column(col)
    for p in stage_plan(cfg):
        t.add_row(p.name, p.backend, p.mode, str(p.num_cpus), str(p.num_gpus), str(p.concurrency), str(p.batch_size))
    con.print(t)


def _print_summary(res) -> None:
    from rich.console import Console
    from rich.table import Table

    m = res.manifest
    c = m["counts"]
    con = Console()
    t = Table(title=f"counterfactory: {m['dataset']}", show_header=False)
    t.add_row("inputs", str(c["inputs"]))
    t.add_row("samples written", f"{c['samples']} in {len(m['shards'])} shard(s)")
    t.add_row("variants", ", ".join(f"{k}={v}" for k, v in c["variants"].items()) or "-")
    t.add_row("rejected inputs", str(c["rejected_inputs"]))
    t.add_row("rejected variants", str(c["rejected_variants"]))
    for r in m["rejects"]:
        t.add_row(f"  {r['stage']}/{r['reason']}", f"{r['count']} ({r['scope']})")
    t.add_row("seconds per stage", ", ".join(f"{k} {v:.2f}" for k, v in res.stage_seconds.items()) or "-")
    t.add_row("wall seconds", f"{res.seconds:.1f}")
    con.print(t)
    # plain print: a path must never be wrapped or truncated by the table
    print(f"output: {res.out_dir.resolve()}")


def cmd_run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    if args.dry_run:
        from counterfactory.pipeline.inputs import load_records

        _print_plan(cfg, len(load_records(cfg, args.limit)))
        return 0
    from counterfactory.pipeline.runner import run_pipeline

    res = run_pipeline(cfg, limit=args.limit, progress=not args.quiet)
    _print_summary(res)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="counterfactory", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run a pipeline config")
    r.add_argument("config")
    r.add_argument("overrides", nargs="*", metavar="dotted.key=value",
                   help="override config values, e.g. output.shard_size=16 stages.edit.params.inpaint_radius=7")
    r.add_argument("--limit", type=int, default=None, help="process only the first N inputs")
    r.add_argument("--dry-run", action="store_true", help="print the resolved config and stage plan, run nothing")
    r.add_argument("--quiet", action="store_true", help="no progress bars")
    r.set_defaults(func=cmd_run)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
