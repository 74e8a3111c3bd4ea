"""Command line.

    counterfactory run CONFIG [dotted.key=value ...] [--limit N] [--dry-run] [--force]
    counterfactory versions DATASET
    counterfactory card DATASET[@VERSION] [--html [--out DIR]] [--serve [--port N]]
    counterfactory regenerate DATASET@VERSION [--scratch DIR] [--keep] [--local]
    counterfactory verify DATASET@VERSION
    counterfactory diff DATASET@A DATASET@B [--json]
    counterfactory plan CONFIG [dotted.key=value ...] [--address http://HEAD:8265]
    counterfactory submit CONFIG [dotted.key=value ...] --address http://HEAD:8265 [--limit N] [--wait S]
                                [--env NAME[=VALUE]] [--pip REQ] [--ship-package]
    counterfactory status|logs|stop JOB --address http://HEAD:8265

DATASET is a dataset name under --root (default ./outputs; a local folder or an object-store URI
such as s3://bucket/prefix) or a path or URI to ROOT/DATASET;
VERSION is a label (v1, v2, ...) or ``latest`` (the default when no @VERSION is given).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import yaml

from counterfactory.pipeline.config import ConfigError, load_config
from counterfactory.pipeline.writer import FailureBudgetExceeded


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
        t.add_row("\n".join(f"{s['name']} ({s['backend']})" for s in step.specs), "actors" if step.actors else "tasks",
                  str(r.num_cpus), str(r.num_gpus), str(r.concurrency or 1) if step.actors else "auto",
                  str(r.batch_size))
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
    _print_stage_report(con, res.out_dir)
    # plain print: a path must never be wrapped or truncated by the table
    print(f"version: {m['dataset']}@{res.label}  spec id {res.spec_id[:12]}  content id {res.content_id[:12]}")
    print(f"output: {res.location}")


def _print_stage_report(con, out_dir: Path) -> None:
    """The run report from summary.json: one row per stage."""
    from rich.table import Table

    try:
        summary = json.loads((out_dir / "summary.json").read_text())
    except (OSError, ValueError):
        return
    t = Table(title="run report")
    for col in ("stage", "rows in", "rows out", "rejects", "busy s", "waiting s", "rows/busy s", "GPU busy"):
        t.add_column(col, justify="left" if col == "stage" else "right")

    def fmt(v, spec="{}") -> str:
        return "-" if v is None else spec.format(v)

    for r in summary.get("stages", []):
        t.add_row(r["stage"], str(r["rows_in"]), str(r["rows_out"]),
                  f"{r['rejected_inputs']}+{r['rejected_variants']}v", f"{r['busy_seconds']:.2f}",
                  fmt(r.get("waiting_seconds"), "{:.2f}"), fmt(r.get("rows_per_busy_second"), "{:.1f}"),
                  fmt(r.get("gpu_busy_share"), "{:.0%}"))
    con.print(t)
    p = summary.get("pipeline", {})
    resumed = summary.get("resumed", {})
    line = (f"pipeline: {p.get('wall_seconds', 0):.1f} s, {fmt(p.get('inputs_per_second'), '{:.1f}')} inputs/s, "
            f"driver waited {p.get('driver_wait_seconds', 0):.1f} s")
    if resumed.get("shards"):
        line += f"; resumed after {resumed['shards']} shard(s) ({resumed['inputs']} inputs)"
    print(line)


def _command_line(argv: list[str] | None) -> str:
    import shlex

    args = sys.argv[1:] if argv is None else argv
    return "counterfactory " + " ".join(shlex.quote(a) for a in args)


def cmd_run(args: argparse.Namespace) -> int:
    # --strict: a dataset over the audit's thresholds is refused at publish (exit 3); it is a
    # failure-budget setting, so it changes no spec id
    overrides = [*args.overrides, *(["failure_budget.refuse_on_audit=true"] if args.strict else [])]
    cfg = load_config(args.config, overrides)
    if args.dry_run:
        from counterfactory.pipeline.inputs import plan_inputs

        _print_plan(cfg, plan_inputs(cfg, args.limit).n)
        return 0
    from counterfactory.pipeline.runner import run_pipeline

    res = run_pipeline(cfg, limit=args.limit, progress=not args.quiet, command=args.command_line,
                       force=args.force)
    if res.reused:
        print(f"{cfg.dataset}@{res.label} already holds this spec (spec id {res.spec_id[:12]}, "
              f"content id {res.content_id[:12]}): nothing to do. Use --force to build a new version.")
        print(f"output: {res.location}")
        return 0
    _print_summary(res)
    return 0


def cmd_versions(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from counterfactory import versions as V

    ds_dir = V.locate_dataset(args.dataset, args.root)
    latest = V.read_latest(ds_dir)
    t = Table(title=f"{ds_dir}")
    for col in ("label", "spec id", "content id", "date", "samples", "rejects", "status"):
        t.add_column(col, no_wrap=True)
    for v in V.list_versions(ds_dir):
        try:
            c = v.manifest()["counts"]
            samples, rejects = str(c["samples"]), f"{c['rejected_inputs']} + {c['rejected_variants']} var."
        except (OSError, ValueError, KeyError):
            samples = rejects = "-"
        label = v.label + (" (latest)" if v.label == latest else "")
        t.add_row(label, (v.info.get("spec_id") or "-")[:12], (v.info.get("content_id") or "-")[:12],
                  v.info.get("created") or "-", samples, rejects, v.status())
    for p in V.staging_dirs(ds_dir):
        t.add_row(p.name, "-", "-", "-", "-", "-", "unfinished run (in progress or crashed)")
    Console(width=max(140, Console().width)).print(t)
    return 0


def cmd_card(args: argparse.Namespace) -> int:
    from counterfactory import versions as V

    v = V.locate(args.dataset, args.root)
    if args.html or args.serve:
        from counterfactory import viewer

        page = viewer.build_viewer(v, out_dir=Path(args.out) if args.out else None,
                                   max_samples=args.max_samples)
        print(page.resolve())
        if args.serve:
            # the default viewer links ../README.md and ../card.json: serve the version folder
            base = v.path if page.parent == v.path / "viewer" else page.parent
            server = viewer.serve(base, port=args.port)
            host, port = server.server_address[:2]
            print(f"serving http://{host}:{port}/{page.relative_to(base).as_posix()}  (Ctrl-C to stop)",
                  flush=True)
            try:
                server.serve_forever()
            except KeyboardInterrupt:
                pass
            finally:
                server.server_close()
        return 0
    readme = v.path / "README.md"
    if not readme.exists():
        print(f"error: {v.path} has no README.md card", file=sys.stderr)
        return 1
    text = readme.read_text()
    if sys.stdout.isatty():
        from rich.console import Console
        from rich.markdown import Markdown

        body = text.split("---", 2)[2] if text.startswith("---") else text
        Console().print(Markdown(body))
    else:
        print(text, end="")
    return 0


def cmd_audit(args: argparse.Namespace) -> int:
    """Recompute a version's shortcut audit with the thresholds of its config; exit 3 when it is
    over them (so scripts can gate on it), 0 otherwise."""
    from counterfactory import audit
    from counterfactory import versions as V

    v = V.locate(args.dataset, args.root)
    if v.remote:
        raise V.VersionError(f"{args.dataset}: audit reads local versions only (copy it first)")
    try:
        a = audit.audit_version(v.path)
    except (KeyError, ValueError) as exc:
        raise V.VersionError(f"{v.path}: cannot audit: {exc}") from None
    if args.json:
        print(json.dumps(a, indent=2, sort_keys=True))
    else:
        print("\n".join(audit.summary_lines(a)))
    return 3 if a["warnings"] else 0


def cmd_verify(args: argparse.Namespace) -> int:
    from counterfactory import versions as V

    v = V.locate(args.dataset, args.root)
    checks = V.verify(v)
    bad = [c for c in checks if not c.ok]
    for c in checks:
        if not c.ok or args.verbose:
            print(f"{'ok  ' if c.ok else 'FAIL'} {c.name}: {c.detail}")
    name = f"{v.dataset}@{v.label}"
    if bad:
        print(f"{name}: {len(bad)} problem(s) in {len(checks)} checks: " + ", ".join(c.name for c in bad))
        return 1
    n = sum(1 for c in checks if c.name.endswith(".tar"))
    print(f"{name}: ok ({n} shard(s), {len(checks)} checks, content id {v.content_id()[:12]})")
    return 0


def cmd_regenerate(args: argparse.Namespace) -> int:
    import shutil
    import tempfile

    from counterfactory import versions as V

    v = V.locate(args.dataset, args.root)
    if not (v.info.get("spec") or {}).get("config") and not (v.path / "config.yaml").exists():
        print(f"error: {v.path} records no spec to regenerate", file=sys.stderr)
        return 2
    scratch = Path(args.scratch) if args.scratch else Path(tempfile.mkdtemp(prefix="counterfactory-regen-"))
    try:
        rep = V.regenerate(v, scratch, local=args.local, progress=not args.quiet)
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


def cmd_diff(args: argparse.Namespace) -> int:
    from counterfactory import versions as V

    a, b = V.locate(args.a, args.root), V.locate(args.b, args.root)
    d = V.diff(a, b)
    if args.json:
        print(json.dumps(d, indent=2, default=str))
        return 0
    print(f"{d['a']} -> {d['b']}" + ("  (content identical)" if d["content_identical"] else ""))
    print("config changes:" + ("" if d["config"] else " none"))
    for c in d["config"]:
        note = "  (placement only: no effect on bytes)" if c.get("placement_only") else ""
        print(f"  {c['key']}: {c['a']!r} -> {c['b']!r}{note}")
    for c in d["spec"]:
        print(f"  {c['key']}: {c['a']!r} -> {c['b']!r}")
    print("counts:")
    for k, c in d["counts"].items():
        mark = f" ({c['delta']:+d})" if c["delta"] else ""
        print(f"  {k}: {c['a']} -> {c['b']}{mark}")
    print("reject reasons:" + ("" if d["rejects"] else " unchanged"))
    for k, c in d["rejects"].items():
        print(f"  {k}: {c['a']} -> {c['b']} ({c['delta']:+d})")
    s = d["samples"]
    print(f"samples: {len(s['added'])} added, {len(s['removed'])} removed, {len(s['changed'])} changed, "
          f"{s['unchanged']} unchanged")
    for label, keys in (("added", s["added"]), ("removed", s["removed"]), ("changed", s["changed"])):
        if keys:
            print(f"  {label}: " + ", ".join(keys[:20]) + (" ..." if len(keys) > 20 else ""))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from counterfactory import evaluate as E

    ds = E.dataset_dir(args.dataset, args.root)
    if args.export:
        out = Path(args.export)
        n = E.export_questions(ds, out)
        root = f" --root {args.root}" if args.root else ""
        print(f"{n} questions to ask written to {out}; answer each row with an 'answer' field and run "
              f"counterfactory eval {args.dataset}{root} --predictions FILE")
        return 0
    if not args.predictions:
        print("error: give --predictions FILE.jsonl (or --export FILE.jsonl)", file=sys.stderr)
        return 2
    if not Path(args.predictions).is_file():
        print(f"error: predictions file not found: {args.predictions}", file=sys.stderr)
        return 2
    abstain = args.abstain
    if abstain is None:  # the answer this dataset abstains with, as its config says
        from counterfactory.versions import version_config

        abstain = version_config(ds).get("abstain_answer", "unknown") if (ds / "config.yaml").exists() else "unknown"
    try:
        rep = E.evaluate(ds, Path(args.predictions), abstain=abstain)
    except E.PredictionsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    out = Path(args.report) if args.report else Path(args.predictions).with_suffix(".report.json")
    out.write_text(json.dumps(rep, indent=2))
    print(E.report_table(rep))
    print(f"report: {out}")
    return 0


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
    if args.command == "status":
        if args.wait:
            print(cluster.wait(args.job, args.address, args.wait))
            return 0
        info = c.get_job_info(args.job)
        st = str(getattr(info.status, "value", info.status))
        print(f"{args.job}: {st}" + (f" ({info.message})" if info.message else ""))
    elif args.command == "logs":
        print(c.get_job_logs(args.job), end="")
    else:
        print(f"{args.job}: {'stop requested' if c.stop_job(args.job) else 'not running'}")
    return 0


def _count(text: str) -> int:
    """--limit: a whole number of inputs, at least 1 (0 would publish an empty version)."""
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {n}")
    return n


def _port(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 0 <= n <= 65535:
        raise argparse.ArgumentTypeError(f"must be 0-65535 (0: any free port), got {n}")
    return n


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="counterfactory", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run a pipeline config")
    r.add_argument("config")
    r.add_argument("overrides", nargs="*", metavar="dotted.key=value",
                   help="override config values, e.g. output.shard_size=16 stages.edit.params.inpaint_radius=7")
    r.add_argument("--limit", type=_count, default=None, help="process only the first N inputs")
    r.add_argument("--dry-run", action="store_true", help="print the resolved config and stage plan, run nothing")
    r.add_argument("--quiet", action="store_true", help="no progress bars")
    r.add_argument("--force", action="store_true", help="build a new version even if this spec has one")
    r.add_argument("--strict", action="store_true",
                   help="refuse to publish a dataset over the shortcut audit's thresholds (exit 3)")
    r.set_defaults(func=cmd_run)

    def root(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--root", default="outputs",
                        help="folder holding the datasets (default: ./outputs); DATASET may also be a path")

    v = sub.add_parser("versions", help="list the versions of a dataset")
    v.add_argument("dataset", metavar="ROOT/DATASET")
    root(v)
    v.set_defaults(func=cmd_versions)
    c = sub.add_parser("card", help="print a version's data card; --html writes the viewer")
    c.add_argument("dataset", metavar="DATASET[@VERSION]")
    root(c)
    c.add_argument("--html", action="store_true", help="write the static HTML viewer and print its path")
    c.add_argument("--serve", action="store_true", help="write the viewer and serve it on 127.0.0.1")
    c.add_argument("--port", type=_port, default=0, help="port for --serve (default: any free port)")
    c.add_argument("--out", default=None, help="viewer folder (default: VERSION/viewer)")
    c.add_argument("--max-samples", type=int, default=300, help="samples shown in the viewer")
    c.set_defaults(func=cmd_card)
    g = sub.add_parser("regenerate", help="re-run a version's spec in a scratch folder and compare bytes")
    g.add_argument("dataset", metavar="DATASET@VERSION")
    root(g)
    g.add_argument("--scratch", default=None, help="where to write (kept); default: a temporary folder")
    g.add_argument("--keep", action="store_true", help="keep the temporary scratch folder")
    g.add_argument("--local", action="store_true", help="run in this process without Ray (same bytes)")
    g.add_argument("--json", action="store_true", help="print the report as JSON")
    g.add_argument("--quiet", action="store_true", help="no progress bars")
    g.set_defaults(func=cmd_regenerate)
    f = sub.add_parser("verify", help="recompute shard checksums and sample counts against the manifest")
    f.add_argument("dataset", metavar="DATASET@VERSION")
    root(f)
    f.add_argument("-v", "--verbose", action="store_true", help="print passing checks too")
    f.set_defaults(func=cmd_verify)
    # -- the shortcut audit (counterfactory.audit) --
    au = sub.add_parser("audit", help="shortcut audit of a version: edit detectability, blind answerers, "
                                      "label balance, presupposing questions")
    au.add_argument("dataset", metavar="DATASET[@vN]")
    root(au)
    au.add_argument("--json", action="store_true", help="print the audit as JSON")
    au.set_defaults(func=cmd_audit)

    d = sub.add_parser("diff", help="compare two versions")
    d.add_argument("a", metavar="DATASET@A")
    d.add_argument("b", metavar="DATASET@B")
    root(d)
    d.add_argument("--json", action="store_true")
    d.set_defaults(func=cmd_diff)
    e = sub.add_parser("eval", help="score a model's answers on a version's pairs (or --export the questions)")
    e.add_argument("dataset", metavar="DATASET@VERSION")
    root(e)
    e.add_argument("--predictions", default=None, help="JSONL: key, variant, qid, answer")
    e.add_argument("--export", default=None, metavar="FILE.jsonl", help="write the questions to ask")
    e.add_argument("--report", default=None, help="report path (default: PREDICTIONS.report.json)")
    e.add_argument("--abstain", default=None, help="the abstention answer (default: the dataset's abstain_answer)")
    e.set_defaults(func=cmd_eval)

    def address(sp: argparse.ArgumentParser, required: bool = True) -> None:
        sp.add_argument("--address", required=required and not os.environ.get("RAY_API_SERVER_ADDRESS"),
                        default=os.environ.get("RAY_API_SERVER_ADDRESS"),
                        help="Ray dashboard (job server) address, e.g. http://HEAD:8265")

    pl = sub.add_parser("plan", help="compare the stages' resources with a cluster's (or this machine's)")
    pl.add_argument("config")
    pl.add_argument("overrides", nargs="*", metavar="dotted.key=value")
    address(pl, required=False)
    pl.set_defaults(func=cmd_plan)
    sb = sub.add_parser("submit", help="run a config as a Ray job on a cluster; prints the job id")
    sb.add_argument("config")
    sb.add_argument("overrides", nargs="*", metavar="dotted.key=value")
    address(sb)
    sb.add_argument("--limit", type=_count, default=None, help="process only the first N inputs")
    sb.add_argument("--pip", action="append", default=None, metavar="REQ",
                    help="runtime_env pip requirement for the job (repeatable), e.g. counterfactory==0.1.0")
    sb.add_argument("--env", action="append", default=None, metavar="NAME[=VALUE]",
                    help="environment variable for the job (repeatable); NAME alone copies this "
                         "shell's value, e.g. --env AWS_PROFILE for an s3:// output root")
    sb.add_argument("--ship-package", action="store_true",
                    help="ship this counterfactory package with the job (runtime_env py_modules)")
    sb.add_argument("--wait", type=float, default=None, metavar="SECONDS",
                    help="wait up to SECONDS for the job to end; exit 0 only if it succeeded")
    sb.set_defaults(func=cmd_submit)
    for name, what in (("status", "a job's status"), ("logs", "a job's logs"), ("stop", "stop a job")):
        j = sub.add_parser(name, help=what)
        j.add_argument("job")
        address(j)
        if name == "status":
            j.add_argument("--wait", type=float, default=None, metavar="SECONDS",
                           help="wait up to SECONDS for the job to end")
        j.set_defaults(func=cmd_job)
    return p


def main(argv: list[str] | None = None) -> int:
    from counterfactory.storage import StorageError
    from counterfactory.versions import VersionError

    args = build_parser().parse_args(argv)
    args.command_line = _command_line(argv)
    try:
        return args.func(args)
    except (ConfigError, VersionError, StorageError) as exc:  # StorageError: an object store failed mid-command
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except FailureBudgetExceeded as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3
    except OSError as exc:  # a file or an object store that failed mid-command
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:
        why = _stage_start_error(exc)
        if why is None:
            raise
        print(f"error: {why}", file=sys.stderr)  # the worker's traceback is in Ray's logs
        return 1


def _stage_start_error(exc: BaseException) -> str | None:
    """The one line of a stage that could not start on a worker, however Ray wrapped it (an
    actor that died in its constructor, a task error, the error as text in another)."""
    import re

    from counterfactory.pipeline.sample import StageStartError

    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, StageStartError):
            return str(e).strip().splitlines()[-1]
        e = getattr(e, "cause", None) or e.__cause__ or e.__context__
    m = re.search(r"StageStartError: (stage .*? could not start: .*)", str(exc))
    return m.group(1) if m else None


if __name__ == "__main__":
    sys.exit(main())
