"""What a version is made from: the spec, its id, the input-set hash, and THE rule of what does
not change a byte (used by ``PipelineConfig.config_hash``, the spec id and ``diff``).

- **spec id** = sha256 of the spec: the resolved config without its output-neutral keys
  (``OUTPUT_NEUTRAL``), the model ids and revisions it names, the input-set hash, ``--limit``
  and the package version. Two runs with the same spec id are expected to produce the same
  bytes; running a spec whose complete version exists is a no-op.
- **input-set hash** = sha256 over the sorted hashes of every source the spec reads: each
  distinct image (stream-hashed in the driver, cached by path, size, mtime and inode) plus the
  annotation files (JSONL manifests, COCO json); a procedural image hashes its URI, which fully
  determines its pixels. After the run, the hashes that ingest computed from the bytes it
  actually read are checked against these: an input changed mid-run fails the run, so a
  version's spec id always describes the bytes it was built from.
"""

from __future__ import annotations

import json
import re
import stat
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from counterfactory import __version__
from counterfactory.layout import atomic_write, sha256_bytes, sha256_file
from counterfactory.storage import is_remote

MODEL_KEY_RE = re.compile(r"(model|checkpoint|weights|revision|repo_id)", re.I)

# What does not change a byte of output, as dotted config keys (``*``: any stage): where work
# runs (Ray placement, stage resources), where the dataset is written, and when to give up
# (raising the failure budget resumes the same spec).
OUTPUT_NEUTRAL = ("ray", "failure_budget", "output.root", "stages.*.resources")


def output_neutral(key: str) -> bool:
    """Whether the dotted config key (as ``diff`` flattens it: stages by name) changes no byte."""
    parts = key.split(".")
    for rule in OUTPUT_NEUTRAL:
        want = rule.split(".")
        if len(parts) >= len(want) and all(w in ("*", p) for w, p in zip(want, parts, strict=False)):
            return True
    return False


def spec_config(cfg_dict: dict[str, Any]) -> dict[str, Any]:
    """The part of a resolved config that shapes the output: ``OUTPUT_NEUTRAL`` removed."""
    d = json.loads(json.dumps(cfg_dict))
    for rule in OUTPUT_NEUTRAL:
        _drop(d, rule.split("."))
    return d


def _drop(node: Any, path: list[str]) -> None:
    head, rest = path[0], path[1:]
    if head == "*":
        for item in node if isinstance(node, list) else []:
            _drop(item, rest)
    elif isinstance(node, dict):
        if not rest:
            node.pop(head, None)
        elif head in node:
            _drop(node[head], rest)


def split_placement(cfg_dict: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(what the version's ``config.yaml`` holds, where the run was placed). The content id
    covers the first only: the same spec on 1 CPU or 64 nodes writes the same manifest. The placement (Ray settings, stage resources) is kept in ``version.json``
    (``with_placement`` puts it back)."""
    d = spec_config(cfg_dict)
    # the failure budget stays in config.yaml: the card's --strict gate reads it there
    d["failure_budget"] = cfg_dict.get("failure_budget")
    place = {"ray": cfg_dict.get("ray"),
             "resources": {s.get("name"): s.get("resources") for s in cfg_dict.get("stages", [])
                           if isinstance(s, dict) and "resources" in s}}
    return d, place


def with_placement(cfg_dict: dict[str, Any], place: dict[str, Any] | None) -> dict[str, Any]:
    """A saved ``config.yaml`` with the placement recorded beside it restored."""
    d = json.loads(json.dumps(cfg_dict))
    if (place or {}).get("ray") is not None:
        d["ray"] = place["ray"]
    for s in d.get("stages", []):
        res = ((place or {}).get("resources") or {}).get(s.get("name"))
        if res is not None:
            s["resources"] = res
    return d


def spec_id(spec: dict[str, Any]) -> str:
    return sha256_bytes(json.dumps(spec, sort_keys=True, separators=(",", ":")).encode())


def config_hash(cfg_dict: dict[str, Any]) -> str:
    """Hash of everything in a resolved config that shapes the output."""
    return spec_id(spec_config(cfg_dict))


def model_refs(stages: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Model ids and revisions named in stage params (or provenance): any key that mentions
    model/checkpoint/weights/revision/repo_id, found at any depth."""
    def walk(node: Any, prefix: str, found: dict[str, Any]) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                key = f"{prefix}{k}"
                if MODEL_KEY_RE.search(str(k)) and not isinstance(v, dict | list):
                    found[key] = v
                else:
                    walk(v, f"{key}.", found)

    out = []
    for s in stages:
        found: dict[str, Any] = {}
        walk(s.get("params", {}), "", found)
        if found:
            out.append({"stage": s.get("name", "?"), "backend": s.get("backend", "default"), **found})
    return out


PROCEDURAL_SCHEMES = ("procedural://", "procedural-video://")


def _object_stamp(uri: str) -> str:
    """An object-store or web source is named by its size and modification time (reading every
    object on the driver to hash it would cost the whole input set's transfer before the run);
    ingest still records each sample's sha256 of the bytes it read."""
    import pyarrow.fs as pafs

    from counterfactory.storage import object_info

    try:
        info = object_info(uri)
    except Exception:  # noqa: BLE001 - an unknown scheme or an unreachable endpoint: ingest says which
        return "unreadable:" + sha256_bytes(uri.encode())
    if info.type == pafs.FileType.NotFound:
        return "missing:" + sha256_bytes(uri.encode())
    return "object:" + sha256_bytes(f"{uri}\n{info.type}\n{info.size}\n{info.mtime_ns}".encode())


class SourceHasher:
    """Stream-hash source files in a thread pool (hashlib releases the GIL), with a cache keyed
    by (path, size, mtime_ns, inode) so a second run of a large input set costs one stat per file."""

    def __init__(self, cache_path: Path | None) -> None:
        self.cache_path = cache_path
        self.cache: dict[str, list[Any]] = {}
        if cache_path and cache_path.exists():
            try:
                self.cache = json.loads(cache_path.read_text())
            except (OSError, ValueError):
                self.cache = {}
        self.dirty = False

    def _one(self, ref: str) -> tuple[str, str]:
        if is_remote(ref):
            return ref, _object_stamp(ref)
        from counterfactory.storage import resolve_path

        try:
            path = resolve_path(ref, None) if ref.startswith("pkg:") else Path(ref)
            st = path.stat()
        except (OSError, ValueError):
            return ref, "missing:" + sha256_bytes(ref.encode())
        if not stat.S_ISREG(st.st_mode):  # /dev/zero never ends, a FIFO blocks: ingest rejects them
            return ref, "not_a_file:" + sha256_bytes(ref.encode())
        stamp = [st.st_size, st.st_mtime_ns, st.st_ino]
        hit = self.cache.get(str(path))
        if hit and hit[:3] == stamp:
            return ref, hit[3]
        try:
            digest = sha256_file(path)
        except OSError:
            return ref, "unreadable:" + sha256_bytes(ref.encode())
        self.cache[str(path)] = [*stamp, digest]
        self.dirty = True
        return ref, digest

    def hash_all(self, refs: Iterable[str]) -> dict[str, str]:
        refs = sorted(set(refs))
        # a procedural scene or clip is its own content: hashed here, not handed to a thread
        # (10,000 scenes cost the driver 0.6 s of pool overhead before the stream could start)
        out = {r: "uri:" + sha256_bytes(r.encode()) for r in refs if r.startswith(PROCEDURAL_SCHEMES)}
        files = [r for r in refs if r not in out]
        with ThreadPoolExecutor(max_workers=min(8, max(1, len(files)))) as pool:
            out.update(pool.map(self._one, files))
        if self.dirty and self.cache_path:
            try:
                self.cache_path.parent.mkdir(parents=True, exist_ok=True)
                atomic_write(self.cache_path, json.dumps(self.cache).encode())
            except OSError:
                pass  # a cache is an optimisation, never a reason to fail
        return out


def build_spec(cfg: Any, plan: Any, limit: int | None,
               cache_path: Path | None = None) -> tuple[dict[str, Any], dict[str, str]]:
    """The spec (what the spec id hashes) and the per-source hashes it was computed from.
    ``plan`` is the run's ``InputPlan``: its record count and its source files."""
    hashes = SourceHasher(cache_path).hash_all(plan.sources)
    resolved = spec_config(cfg.resolved())
    spec = {
        "config": resolved,
        "models": model_refs(resolved.get("stages", [])),
        "input_set_hash": sha256_bytes("\n".join(sorted(hashes.values())).encode()),
        "inputs": {"records": plan.n, "sources": len(hashes)},
        "limit": limit,
        "package_version": __version__,
    }
    # cut-outs from a folder (issue 31) are inputs too: their bytes move the spec id. Cut-outs
    # taken from the run's own manifests are already in the input-set hash.
    folder_cutouts = [c["source"] for c in cfg.run_settings().cutouts if c.get("polygons") is None]
    if folder_cutouts:
        cut = SourceHasher(None).hash_all(folder_cutouts)
        spec["cutouts_hash"] = sha256_bytes("\n".join(f"{k}\t{v}" for k, v in sorted(cut.items())).encode())
    return spec, hashes


def check_sources_unchanged(hashes: dict[str, str], index_rows: list[dict[str, Any]]) -> list[str]:
    """Sources whose bytes, as ingest read them, differ from the pre-run hash (changed mid-run)."""
    bad = []
    for row in index_rows:
        pre = hashes.get(row["source"])
        if pre and ":" not in pre and pre != row["source_sha256"]:
            bad.append(row["source"])
    return sorted(set(bad))
