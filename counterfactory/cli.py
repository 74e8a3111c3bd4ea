"""Command line: ``counterfactory VERB ...`` (``counterfactory VERB --help`` for each verb).

Verbs: run, versions, card, verify, regenerate, diff, eval, export, push, tag, pin, plan, submit,
status, logs, stop. Overrides (``dotted.key=value``) and flags go in any order. User errors are
one line on stderr. Exit codes: 0 done (status: the job SUCCEEDED), 1 a check failed or the job
FAILED/STOPPED, 2 a usage or input error, 3 a run stopped by its failure budget or nothing to
publish (status: the job is still PENDING/RUNNING).

DATASET is a dataset name under --root (default ./outputs; a local folder or an object-store URI
such as s3://bucket/prefix) or a path or URI to ROOT/DATASET; @VERSION is a label (v1, v2, ...),
``latest`` (the default) or a tag given with ``counterfactory tag``.
"""

# This module is the parser and the entry point (its docstring is the --help text). Each verb is
# one small function: the verbs that build data in cli_run.py, the verbs that read a published
# version in cli_versions.py; output formatting lives in console.py.

from __future__ import annotations

import argparse
import errno
import os
import sys

from counterfactory.cli_run import cmd_job, cmd_pin, cmd_plan, cmd_regenerate, cmd_run, cmd_submit
from counterfactory.cli_versions import (
    cmd_audit,
    cmd_card,
    cmd_diff,
    cmd_eval,
    cmd_export,
    cmd_push,
    cmd_tag,
    cmd_verify,
    cmd_versions,
)
from counterfactory.pipeline.config import ConfigError
from counterfactory.publish import FailureBudgetExceeded


def _command_line(argv: list[str] | None) -> str:
    import shlex

    args = sys.argv[1:] if argv is None else argv
    return "counterfactory " + " ".join(shlex.quote(a) for a in args)


def _count(text: str) -> int:
    """--limit: a whole number of inputs, at least 1 (0 would publish an empty version)."""
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {n}")
    return n


def _at_least_zero(text: str) -> int:
    """--max-samples: a whole number, 0 or more (a negative one would slice from the end)."""
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if n < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {n}")
    return n


def _port(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 0 <= n <= 65535:
        raise argparse.ArgumentTypeError(f"must be 0-65535 (0: any free port), got {n}")
    return n


OVERRIDE_VERBS = ("run", "plan", "submit")  # verbs whose extra KEY=VALUE words are config overrides


def build_parser() -> argparse.ArgumentParser:
    from counterfactory import __version__

    raw = argparse.RawDescriptionHelpFormatter
    p = argparse.ArgumentParser(prog="counterfactory", description=__doc__, formatter_class=raw)
    p.add_argument("--version", action="version", version=f"counterfactory {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="VERB")

    def verb(name: str, summary: str, example: str, func) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=summary, description=summary, epilog=f"example:\n  {example}",
                            formatter_class=raw)
        sp.set_defaults(func=func)
        return sp

    def root(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--root", default="outputs",
                        help="folder holding the datasets (default: ./outputs); DATASET may also be a path")

    def overrides(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("config", help="pipeline config (YAML)")
        sp.add_argument("overrides", nargs="*", metavar="dotted.key=value",
                        help="override config values (before or after the flags), e.g. output.shard_size=16")

    r = verb("run", "run a pipeline config and publish a new version",
             "counterfactory run configs/demo.yaml output.shard_size=8 --limit 20", cmd_run)
    overrides(r)
    r.add_argument("--limit", type=_count, default=None,
                   help="process only the first N inputs (a limited version: never `latest` unless --latest)")
    r.add_argument("--latest", action="store_true", help="make a --limit version `latest` all the same")
    r.add_argument("--dry-run", action="store_true", help="print the resolved config and stage plan, run nothing")
    r.add_argument("--quiet", action="store_true", help="print only errors and the version line")
    r.add_argument("--verbose", action="store_true", help="also show Ray's own log lines and progress bars")
    r.add_argument("--force", action="store_true", help="build a new version even if this spec has one")
    r.add_argument("--strict", action="store_true",
                   help="refuse to publish a dataset over the shortcut audit's thresholds (exit 3)")

    v = verb("versions", "list the versions of a dataset (labels, ids, counts, tags, health)",
             "counterfactory versions demo --json", cmd_versions)
    v.add_argument("dataset", metavar="DATASET")
    root(v)
    v.add_argument("--json", action="store_true", help="print the list as JSON")
    c = verb("card", "print a version's data card; --html writes the side-by-side viewer",
             "counterfactory card demo@v2 --html", cmd_card)
    c.add_argument("dataset", metavar="DATASET[@VERSION]")
    root(c)
    c.add_argument("--html", action="store_true", help="write the static HTML viewer and print its path")
    c.add_argument("--serve", action="store_true", help="write the viewer and serve it on 127.0.0.1")
    c.add_argument("--port", type=_port, default=0, help="port for --serve (default: any free port)")
    c.add_argument("--out", default=None, help="viewer folder (default: VERSION/viewer)")
    c.add_argument("--max-samples", type=_at_least_zero, default=300, help="samples shown in the viewer")
    g = verb("regenerate", "re-run a version's spec in a scratch folder and compare bytes",
             "counterfactory regenerate demo@v2 --local", cmd_regenerate)
    g.add_argument("dataset", metavar="DATASET@VERSION")
    root(g)
    g.add_argument("--scratch", default=None, help="where to write (kept); default: a temporary folder")
    g.add_argument("--keep", action="store_true", help="keep the temporary scratch folder")
    g.add_argument("--local", action="store_true", help="run in this process without Ray (same bytes)")
    g.add_argument("--json", action="store_true", help="print the report as JSON")
    g.add_argument("--quiet", action="store_true", help="no progress bars")
    f = verb("verify", "recompute shard and file checksums and sample counts against the manifest",
             "counterfactory verify demo@v2", cmd_verify)
    f.add_argument("dataset", metavar="DATASET@VERSION")
    root(f)
    f.add_argument("-v", "--verbose", action="store_true", help="print passing checks too")
    au = verb("audit", "shortcut audit of a version: edit detectability, blind answerers, label balance, "
              "presupposing questions (exit 3 when over its thresholds)", "counterfactory audit demo@v2 --json",
              cmd_audit)
    au.add_argument("dataset", metavar="DATASET[@vN]")
    root(au)
    au.add_argument("--json", action="store_true", help="print the audit as JSON")

    d = verb("diff", "compare two versions (config, counts, reject reasons, samples)",
             "counterfactory diff demo@v1 demo@v2 --json", cmd_diff)
    d.add_argument("a", metavar="DATASET@A")
    d.add_argument("b", metavar="DATASET@B")
    root(d)
    d.add_argument("--json", action="store_true", help="print the comparison as JSON")
    e = verb("eval", "score a model's answers on a version's pairs (or --export the questions)",
             "counterfactory eval demo --predictions answers.jsonl --json", cmd_eval)
    e.add_argument("dataset", metavar="DATASET@VERSION")
    root(e)
    e.add_argument("--predictions", default=None,
                   help="JSONL: key, variant, qid, answer (a paper's export: that paper's answer format)")
    e.add_argument("--export", default=None, metavar="FILE.jsonl", help="write the questions to ask")
    e.add_argument("--report", default=None, help="report path (default: PREDICTIONS.report.json)")
    e.add_argument("--abstain", default=None, help="the abstention answer (default: the dataset's abstain_answer)")
    e.add_argument("--json", action="store_true", help="print the report as JSON")
    x = verb("export", "write a version for a trainer: llava | trl | sharegpt (LLaMA-Factory) | parquet",
             "counterfactory export demo@v2 --format trl --out exports/demo-trl --split train=0.9,test=0.1", cmd_export)
    x.add_argument("dataset", metavar="DATASET@VERSION")
    root(x)
    x.add_argument("--format", required=True, metavar="FORMAT",
                   help="llava, trl, sharegpt, parquet; or a paper's layout: pope, popev2, beaf, defacto, countercurate")
    x.add_argument("--out", required=True, metavar="DIR", help="a new or empty folder (or an earlier export)")
    x.add_argument("--variants", default=None, metavar="V1,V2",
                   help="images to export: orig and variant names (default: all)")
    x.add_argument("--split", default=None, metavar="NAME=FRAC,...",
                   help="split by source image, e.g. train=0.9,test=0.1 (default: all in train)")
    x.add_argument("--quiet", action="store_true", help="no progress display")
    h = verb("push", "upload a verified version to a Hugging Face dataset repo (token from HF_TOKEN)",
             "counterfactory push demo@v2 me/demo-counterfactuals --private", cmd_push)
    h.add_argument("dataset", metavar="DATASET@VERSION")
    h.add_argument("repo_id", metavar="REPO_ID", help="the dataset repo, e.g. user/name")
    root(h)
    h.add_argument("--private", action="store_true", help="create the repo private")
    h.add_argument("--revision", default=None, help="branch to commit to (default: main)")
    h.add_argument("--large", action="store_true", help="use upload_large_folder (resumable, many commits)")
    h.add_argument("--quiet", action="store_true", help="no progress display")
    t = verb("tag", "give a version a name that loads like a label (DATASET@NAME); never moved",
             "counterfactory tag demo@v2 paper-2025", cmd_tag)
    t.add_argument("dataset", metavar="DATASET@VERSION")
    t.add_argument("name", metavar="NAME")
    root(t)

    pn = verb("pin", "write the Hub commit of every model and LoRA into a config (a branch such as main moves)",
              "counterfactory pin configs/gpu.yaml --write", cmd_pin)
    pn.add_argument("config", help="pipeline config (YAML); comments and layout are kept")
    pn.add_argument("--write", action="store_true", help="rewrite the file (default: print the diff)")
    pn.add_argument("--offline", action="store_true", help="read commits from the local Hub cache only")
    pn.add_argument("--endpoint", default=None, help="Hub endpoint (default: HF_ENDPOINT or huggingface.co)")

    def address(sp: argparse.ArgumentParser, required: bool = True) -> None:
        sp.add_argument("--address", required=required and not os.environ.get("RAY_API_SERVER_ADDRESS"),
                        default=os.environ.get("RAY_API_SERVER_ADDRESS"),
                        help="Ray dashboard (job server) address, e.g. http://HEAD:8265")

    pl = verb("plan", "compare the stages' resources with a cluster's (or this machine's)",
              "counterfactory plan configs/gpu.yaml --address http://HEAD:8265", cmd_plan)
    overrides(pl)
    address(pl, required=False)
    sb = verb("submit", "run a config as a Ray job on a cluster; prints the job id",
              "counterfactory submit configs/gpu.yaml --address http://HEAD:8265 output.root=/shared/datasets",
              cmd_submit)
    overrides(sb)
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
    for name, what in (("status", "a job's status (exit 0 succeeded, 1 failed/stopped, 3 pending/running)"),
                       ("logs", "a job's logs"), ("stop", "stop a job")):
        j = verb(name, what, f"counterfactory {name} raysubmit_XXXX --address http://HEAD:8265", cmd_job)
        j.add_argument("job")
        address(j)
        if name == "status":
            j.add_argument("--wait", type=float, default=None, metavar="SECONDS",
                           help="wait up to SECONDS for the job to end")
            j.add_argument("--json", action="store_true", help="print the job's status as JSON")
    return p


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Overrides may follow flags (``run CFG --dry-run key=val``): argparse stops filling a
    positional list at the first flag, so words left over that look like ``key=value`` are
    the verb's overrides; anything else is the usual one-line usage error (exit 2)."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        if args.command in OVERRIDE_VERBS and all("=" in w and not w.startswith("-") for w in extra):
            args.overrides = [*args.overrides, *extra]
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def main(argv: list[str] | None = None) -> int:
    from counterfactory.export import ExportError
    from counterfactory.hub import HubError
    from counterfactory.storage import StorageError
    from counterfactory.versions import VersionError

    args = parse_args(argv)
    args.command_line = _command_line(argv)
    try:
        return args.func(args)
    except (ConfigError, VersionError, StorageError, ExportError) as exc:  # StorageError: a store failed mid-command
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except HubError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except FailureBudgetExceeded as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3
    except OSError as exc:  # a path the user gave that cannot be used, or a store that failed mid-command
        line, code = os_error_line(exc)
        print(f"error: {line}", file=sys.stderr)
        return code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        why = _stage_start_error(exc)
        if why is None:
            raise
        print(f"error: {why}", file=sys.stderr)  # the worker's traceback is in Ray's logs
        return 1


# errors of a path as given (missing, a file for a folder, a folder for a file, too long, not
# allowed): a usage error, exit 2; any other OSError (disk full, I/O, a store) failed the command
_PATH_ERRNOS = {errno.ENOENT, errno.ENOTDIR, errno.EISDIR, errno.ENAMETOOLONG, errno.EACCES, errno.EPERM,
                errno.EROFS, errno.EEXIST, errno.ELOOP, errno.ENXIO, errno.ENODEV, errno.EINVAL}


def os_error_line(exc: OSError) -> tuple[str, int]:
    """One line for an OSError (the path shortened, no errno number) and its exit code: 2 when
    it is about a path the user named, 1 otherwise."""
    from counterfactory.versions import short_name

    why = exc.strerror or " ".join(str(exc).split()) or type(exc).__name__
    names = [os.fsdecode(f) for f in (exc.filename, exc.filename2) if f is not None]
    line = f"{' -> '.join(short_name(n) for n in names)}: {why}" if names else short_name(why, 300)
    return line, 2 if names and exc.errno in _PATH_ERRNOS else 1


def _stage_start_error(exc: BaseException) -> str | None:
    """The one line of a stage that could not start on a worker, however Ray wrapped it (an
    actor that died in its constructor, a task error, the error as text in another)."""
    import re

    from counterfactory.sample import StageStartError

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
