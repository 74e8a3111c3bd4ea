"""The ``counterfactory`` verbs that build data: run, regenerate, and the cluster verbs plan,
submit, status, logs and stop (the parser and exit codes are in ``cli.py``)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import yaml

from counterfactory import layout
from counterfactory.pipeline.config import load_config


def _print_plan(cfg, n_inputs: int) -> None:
    from rich.console import Console
    from rich.table import Table

    from counterfactory.pipeline.runner import plan_steps

    con = Console()
    con.print(yaml.safe_dump(cfg.resolved(), sort_keys=False))
    t = Table(title=f"stage plan ({n_inputs} inputs): one row per map_batches step")
    for col in ("stages (backend)", "runs as", "CPUs", "GPUs", "actors", "batch"):
        t.add_column(col, no_wrap=col != "stages (backend)")
    for step in plan_steps(cfg):
        r = step.resources
        t.add_row("\n".join(_spec_label(s) for s in step.specs), "actors" if step.actors else "tasks",
                  str(r.num_cpus), str(r.num_gpus), str(r.concurrency or 1) if step.actors else "auto",
                  str(r.batch_size))
    con.print(t)


def _spec_label(spec) -> str:
    """``edit (diffusers-inpaint)``; a model stage split by the plan (issue 28) names its part:
    ``edit (diffusers-inpaint): host before`` in a CPU step, ``: model`` in the actor step."""
    part = {"all": "", "model": ": model"}.get(spec.part, f": host {spec.part}")
    return f"{spec.name} ({spec.backend}){part}"


def cmd_run(args: argparse.Namespace) -> int:
    from counterfactory import console
    from counterfactory.pipeline.inputs import plan_inputs

    # --strict: a dataset over the audit's thresholds is refused at publish (exit 3); it is a
    # failure-budget setting, so it changes no spec id
    overrides = [*args.overrides, *(["failure_budget.refuse_on_audit=true"] if args.strict else [])]
    cfg = load_config(args.config, overrides)
    if args.dry_run:
        _print_plan(cfg, plan_inputs(cfg, args.limit, count_only=True).n)  # streamed: no slice kept
        return 0
    from counterfactory.pipeline.runner import run_pipeline

    total = plan_inputs(cfg, args.limit, count_only=True).n  # counting is cheap (no image is read)
    with console.RunProgress(total, f"{cfg.dataset}", enabled=not args.quiet) as display:
        res = run_pipeline(cfg, limit=args.limit, progress=args.verbose, command=args.command_line,
                           force=args.force, latest=args.latest, on_progress=display, verbose=args.verbose)
    if res.reused:
        if args.quiet:
            print(console.version_line(res))
            return 0
        print(f"{cfg.dataset}@{res.label} already holds this spec (spec id {res.spec_id[:12]}, "
              f"content id {res.content_id[:12]}): nothing to do. Use --force to build a new version.")
        print(f"output: {res.location}")
        return 0
    if args.quiet:
        print(console.version_line(res))
        return 0
    root_arg = "" if cfg.output.root == "outputs" else f" --root {_display_root(res)}"
    console.print_lines(console.run_summary(res, root_arg=root_arg))
    return 0


def _display_root(res) -> str:
    """The --root that names this version from here (relative when that is shorter)."""
    loc = res.location
    if "://" in loc:
        return loc.rsplit("/", 2)[0]
    root = Path(loc).parent.parent
    rel = os.path.relpath(root)
    return rel if not rel.startswith("..") or len(rel) < len(str(root)) else str(root)


def cmd_regenerate(args: argparse.Namespace) -> int:
    import shutil
    import tempfile

    from counterfactory import versions as V
    from counterfactory.regenerate import regenerate

    v = V.locate(args.dataset, args.root)
    if not (v.info.get("spec") or {}).get("config") and not (v.path / layout.CONFIG).exists():
        print(f"error: {v.path} records no spec to regenerate", file=sys.stderr)
        return 2
    scratch = Path(args.scratch) if args.scratch else Path(tempfile.mkdtemp(prefix="counterfactory-regen-"))
    try:
        from counterfactory import console

        with console.status(f"regenerating {v.dataset}@{v.label} in {scratch}", enabled=not args.quiet):
            rep = regenerate(v, scratch, local=args.local, progress=False, verbose=False)
    finally:
        if not args.keep and not args.scratch:
            shutil.rmtree(scratch, ignore_errors=True)
    if args.json:
        print(json.dumps(rep, indent=2))
    else:
        for ch in rep["spec_changes"]:
            print(f"note: {ch['key']} differs from the stored spec: {ch['a']} -> {ch['b']}")
        if rep["identical"] and rep["stored_failures"]:
            print(f"{rep['version']}: the spec regenerates content id {rep['content_id'][:12]} byte for byte, "
                  f"but the stored copy is damaged: " + "; ".join(rep["stored_failures"][:5]))
        elif rep["identical"]:
            print(f"{rep['version']}: identical: content id {rep['content_id'][:12]} regenerated byte for byte")
        else:
            print(f"{rep['version']}: DIFFERENT: content id {rep['content_id'][:12]} "
                  f"!= regenerated {rep['regenerated_content_id'][:12]}")
            print(f"  differing shards ({len(rep['shards'])}): " + (", ".join(rep["shards"]) or "-"))
            print(f"  differing samples ({len(rep['samples'])}): " + (", ".join(rep["samples"][:50]) or "-")
                  + (" ..." if len(rep["samples"]) > 50 else ""))
            if rep["files"]:
                print("  differing files: " + ", ".join(rep["files"]))
            if rep["manifest_fields"]:
                print("  differing manifest fields: " + ", ".join(rep["manifest_fields"]))
        if args.keep or args.scratch:
            print(f"scratch: {rep['scratch']}")
    return 0 if rep["identical"] and not rep["stored_failures"] else 1


def cmd_plan(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from counterfactory import cluster

    cfg = load_config(args.config, args.overrides)
    nodes = cluster.cluster_nodes(args.address) if args.address else cluster.local_nodes()
    plan = cluster.make_plan(cfg, nodes)
    con = Console()
    where = args.address or "this machine"
    print(f"{len(nodes)} node(s) at {where}: {sum(n.cpus for n in nodes):g} CPU, "
          f"{sum(n.gpus for n in nodes):g} GPU, {sum(n.memory for n in nodes) / 2**30:.1f} GiB")
    t = Table(title="steps")
    for col in ("step", "runs as", "CPU", "GPU", "memory GiB", "concurrency", "nodes that fit"):
        t.add_column(col, overflow="fold")
    for s in plan.steps:
        t.add_row(s["step"], s["runs_as"], f"{s['cpus']:g}", f"{s['gpus']:g}",
                  f"{s['memory'] / 2**30:.1f}" if s["memory"] else "-", str(s["concurrency"]), str(s["nodes_that_fit"]))
    con.print(t)
    for line in plan.wont_fit:
        print(f"will not fit: {line}")
    for line in plan.idle:
        print(f"idle: {line}")
    for line in plan.notes:
        print(f"note: {line}")
    if plan.ok and not plan.idle:
        print("ok: every step can be placed")
    return 0 if plan.ok else 1


def cmd_submit(args: argparse.Namespace) -> int:
    from counterfactory import cluster

    job_id = cluster.submit(args.config, args.overrides, args.address, limit=args.limit,
                            pip=args.pip, ship_package=args.ship_package, env=args.env)
    print(job_id)
    if args.wait:
        status = cluster.wait(job_id, args.address, args.wait)
        print(f"{job_id}: {status}")
        return 0 if status == "SUCCEEDED" else 1
    return 0


def cmd_job(args: argparse.Namespace) -> int:
    from counterfactory import cluster

    c = cluster.client(args.address)
    try:
        if args.command == "status":
            if args.wait:
                cluster.wait(args.job, args.address, args.wait)
            info = c.get_job_info(args.job)
            st = str(getattr(info.status, "value", info.status))
            if args.json:
                print(json.dumps({"job": args.job, "status": st, "message": info.message,
                                  "entrypoint": info.entrypoint, "start_time": info.start_time,
                                  "end_time": info.end_time}, indent=2))
            else:
                print(f"{args.job}: {st}" + (f" ({info.message})" if info.message else ""))
            return JOB_EXIT.get(st, 3)
        if args.command == "logs":
            print(c.get_job_logs(args.job), end="")
        else:
            print(f"{args.job}: {'stop requested' if c.stop_job(args.job) else 'not running'}")
    except RuntimeError as exc:  # the job server's answer (e.g. 404: no such job), as one line
        msg = str(exc).strip().splitlines()
        print(f"error: {args.job}: {msg[-1] if msg else type(exc).__name__}", file=sys.stderr)
        return 2
    return 0


# status: 0 succeeded, 1 failed or stopped, 3 not finished (a script can wait on it)
JOB_EXIT = {"SUCCEEDED": 0, "FAILED": 1, "STOPPED": 1, "PENDING": 3, "RUNNING": 3}


def cmd_pin(args: argparse.Namespace) -> int:
    from counterfactory.pin import PinError, pin_file

    try:
        diff, refs = pin_file(Path(args.config), write=args.write, offline=args.offline, endpoint=args.endpoint)
    except PinError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for r in refs:
        state = "pinned" if r.source == "config" else f"{r.commit} (from the {r.source})"
        print(f"{r.label}: {state}")
    if not diff:
        print(f"{args.config}: every Hub model is pinned to a commit")
    elif args.write:
        print(f"{args.config}: written")
    else:
        sys.stdout.write(diff)
        print("(dry run: --write to apply)")
    return 0
