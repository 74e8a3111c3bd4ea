"""``counterfactory pin CONFIG``: every Hub model of a config pinned to the commit it is now.

A branch such as ``main`` moves: a dataset regenerated next month from ``revision: main`` may
load other weights and so make other bytes. Provenance already records the commit a run loaded
(``stages.models.common.resolved_commit``); this command puts that commit into the recipe. It
asks the Hub (``HfApi.model_info``; the token from the environment, ``HF_ENDPOINT`` honoured) or,
with ``--offline`` or when the Hub cannot be reached, the local Hub cache (an air-gapped machine
with a mirrored cache), which commit each ``model:`` and each LoRA ``id:`` at its ``revision:``
points at, and writes it as ``revision: <40 hex>``.

The file is edited line by line, so its comments and layout stay; the edit is then checked by
parsing: the new file must load to the old one with only those revisions changed, or nothing is
written and the commits are printed to set by hand. Local folders, served models (``base_url``)
and revisions that already are commits are left as they are.
"""

from __future__ import annotations

import copy
import difflib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from counterfactory.layout import atomic_write

COMMIT = re.compile(r"[0-9a-f]{40}")
# a Hub repo id: "name" or "namespace/name" (letters, digits, - _ .)
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


class PinError(Exception):
    """A config that cannot be pinned (one line for the CLI)."""


@dataclass
class HubRef:
    """One Hub model reference of a config: where it is in the parsed YAML and what it says."""

    where: tuple[Any, ...]  # keys/indices from the document root to the mapping
    key: str  # "model", or "id" for a LoRA entry
    repo: str
    revision: str | None
    commit: str | None = None
    source: str = ""  # "hub" or "cache": where the commit was read

    @property
    def label(self) -> str:
        return f"{self.repo}@{self.revision or 'main'}"


def _is_hub_id(ref: str) -> bool:
    if not _HUB_ID.fullmatch(ref) or ref.startswith((".", "~")):
        return False
    return not Path(ref).expanduser().exists()  # a folder of that name here is a local copy


def hub_refs(data: Any) -> list[HubRef]:
    """The Hub references of a parsed config, in document order: mappings with a ``model`` that
    is a Hub id (not a served name next to ``base_url``), and the ``id`` of each ``loras`` item."""
    out: list[HubRef] = []

    def walk(node: Any, where: tuple[Any, ...], in_loras: bool) -> None:
        if isinstance(node, dict):
            key = "id" if in_loras else "model"
            ref = node.get(key)
            if isinstance(ref, str) and "base_url" not in node and _is_hub_id(ref):
                rev = node.get("revision")
                out.append(HubRef(where, key, ref, None if rev is None else str(rev)))
            for k, v in node.items():
                walk(v, (*where, k), k == "loras")
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, (*where, i), in_loras)

    walk(data, (), False)
    return out


def resolve(ref: HubRef, *, offline: bool = False, endpoint: str | None = None, timeout: float = 20.0) -> None:
    """Fill ``ref.commit``: the Hub's answer, else (offline, or the Hub unreachable) the cache's."""
    if ref.revision and COMMIT.fullmatch(ref.revision):
        ref.commit, ref.source = ref.revision, "config"
        return
    reason = "--offline"
    if not offline:
        from huggingface_hub import HfApi
        from huggingface_hub.errors import (
            GatedRepoError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )

        try:
            info = HfApi(endpoint=endpoint).model_info(ref.repo, revision=ref.revision or "main", timeout=timeout)
        except RevisionNotFoundError:
            raise PinError(f"{ref.label}: the Hub has no revision {ref.revision or 'main'!r} of {ref.repo}") from None
        except GatedRepoError:
            raise PinError(f"{ref.label}: gated on the Hub; accept its terms and set HF_TOKEN") from None
        except RepositoryNotFoundError:
            raise PinError(f"{ref.label}: no such model repo on the Hub (or it is private: set HF_TOKEN)") from None
        except Exception as exc:  # noqa: BLE001 - unreachable Hub: the cache may still know
            reason = f"the Hub did not answer ({type(exc).__name__}: {str(exc)[:120]})"
        else:
            if info.sha:
                ref.commit, ref.source = info.sha, "hub"
                return
            reason = "the Hub's answer had no commit"
    from counterfactory.stages.models.common import resolved_commit

    commit = resolved_commit(ref.repo, ref.revision)
    if not commit:
        raise PinError(f"{ref.label}: {reason}, and the local Hub cache has no snapshot of it")
    ref.commit, ref.source = commit, "cache"


# -- the line edit ---------------------------------------------------------------------------------
_VALUE = r"""("[^"]*"|'[^']*'|[^\s#,{}\[\]]+)"""


def _code(line: str) -> str:
    """The line without its comment (a ``#`` after a space or at the start, outside quotes)."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "\"'":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i]
    return line


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def _pin_line(lines: list[str], start: int, ref: HubRef) -> int:
    """Write ``ref.commit`` next to the first ``KEY: REPO`` at or after ``start``; returns the
    index of the line the key was found on."""
    key_re = re.compile(rf"""(^|[{{,\s-])({ref.key}):\s*(["']?){re.escape(ref.repo)}\3(?=\s*($|[,}}#]))""")
    for i in range(start, len(lines)):
        code = _code(lines[i].rstrip("\n"))
        m = key_re.search(code)
        if not m:
            continue
        brace = code.rfind("{", 0, m.start(2))
        if brace >= 0 and code.find("}", m.end()) >= 0:  # a flow mapping on this line
            close = code.find("}", m.end())
            body = code[brace:close]
            rev = re.search(rf"(^|[{{,\s])revision:\s*{_VALUE}", body)
            line = lines[i]
            if rev:
                a, b = brace + rev.start(2), brace + rev.end(2)
                lines[i] = line[:a] + ref.commit + line[b:]
            else:
                lines[i] = line[:m.end()] + f", revision: {ref.commit}" + line[m.end():]
            return i
        col = m.start(2)  # the mapping's keys start at this column
        for j in range(i + 1, len(lines)):
            code_j = _code(lines[j].rstrip("\n"))
            if not code_j.strip():
                continue
            if _indent(code_j) < col or (_indent(code_j) == col and code_j.lstrip().startswith("- ")):
                break
            if _indent(code_j) == col:
                rev = re.match(rf"\s*revision:\s*{_VALUE}?", code_j)
                if rev:
                    a = rev.start(1) if rev.group(1) else rev.end()
                    b = rev.end(1) if rev.group(1) else rev.end()
                    pad = "" if rev.group(1) else " "
                    lines[j] = lines[j][:a] + pad + ref.commit + lines[j][b:]
                    return i
        lines.insert(i + 1, " " * col + f"revision: {ref.commit}\n")
        return i
    raise PinError(f"{ref.label}: could not find '{ref.key}: {ref.repo}' in the file's text")


def _expected(data: Any, refs: list[HubRef]) -> Any:
    want = copy.deepcopy(data)
    for r in refs:
        node = want
        for k in r.where:
            node = node[k]
        node["revision"] = r.commit
    return want


def pin_text(text: str, *, offline: bool = False, endpoint: str | None = None) -> tuple[str, list[HubRef]]:
    """The config text with every Hub reference pinned, and the references (with their commits)."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise PinError(f"not valid YAML: {str(exc).splitlines()[0]}") from None
    refs = hub_refs(data)
    for r in refs:
        resolve(r, offline=offline, endpoint=endpoint)
    todo = [r for r in refs if r.revision != r.commit]
    lines = text.splitlines(keepends=True)
    if lines and not lines[-1].endswith("\n"):
        lines[-1] += "\n"
    at = 0
    for r in todo:
        at = _pin_line(lines, at, r)
    new = "".join(lines)
    if yaml.safe_load(new) != _expected(data, refs):
        table = "; ".join(f"{r.label} -> {r.commit}" for r in todo)
        raise PinError(f"could not edit the file in place without changing something else; set these by hand: {table}")
    return new, refs


def pin_file(path: Path, *, write: bool = False, offline: bool = False, endpoint: str | None = None) -> tuple[str, list[HubRef]]:
    """Pin ``path``; returns a unified diff (empty when nothing moves) and the references. With
    ``write`` the file is replaced atomically."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise PinError(f"cannot read {path}: {exc}") from None
    new, refs = pin_text(text, offline=offline, endpoint=endpoint)
    diff = "".join(difflib.unified_diff(text.splitlines(keepends=True), new.splitlines(keepends=True),
                                        str(path), f"{path} (pinned)"))
    if write and new != text:
        atomic_write(path, new.encode("utf-8"))
    return diff, refs
