"""``counterfactory push DATASET@vN REPO_ID``: a verified version folder to a Hugging Face dataset repo.

The version folder is already what the Hub reads: the card (README.md) declares the ``pairs/``
layout in its front matter (``configs:``/``data_files:``, features, license), so the Hub's viewer
and ``datasets.load_dataset(REPO_ID)`` read it with no loading script. A push uploads the folder
as it is, through ``huggingface_hub`` (the token comes from the environment: ``HF_TOKEN`` or the
login ``huggingface-cli`` stored), and records the Hub commit in ``version.json`` (``hub``:
repo, revision, date), which is not part of the manifest and so never changes a content id.

A version that fails ``verify`` is refused before anything is sent: a damaged copy must not
become the one everyone downloads.
"""

from __future__ import annotations

import json
from typing import Any

from counterfactory import versions as V
from counterfactory.layout import VERSION_FILE
from counterfactory.verify import verify

# working files that are not part of a version (a viewer is rebuilt from the version on demand)
IGNORE = [".lock", ".journal/**", ".claim.json", "viewer/**", "**/.*.tmp"]


class HubError(Exception):
    """A push that cannot go ahead or did not succeed (one line for the CLI)."""


def push(version: V.Version, repo_id: str, *, private: bool = False, revision: str | None = None,
         large: bool = False, commit_message: str | None = None) -> dict[str, Any]:
    """Verify ``version``, create the dataset repo if needed and upload the folder; returns the
    record written to version.json's ``hub`` list."""
    if not version.folder.is_local:  # the Hub client uploads a folder of this machine
        raise HubError(f"{version.location} is on an object store: push a local copy of it "
                       "(e.g. regenerate it with a local --scratch folder)")
    bad = [c for c in verify(version) if not c.ok]
    if bad:
        raise HubError(f"{version.dataset}@{version.label} fails verify ({len(bad)} problem(s): "
                       + "; ".join(f"{c.name}: {c.detail}" for c in bad[:3]) + "); nothing pushed")
    try:
        from huggingface_hub import HfApi
        from huggingface_hub.errors import HfHubHTTPError, HFValidationError, OfflineModeIsEnabled
    except ImportError as exc:  # a declared dependency, but say what to install if it is gone
        raise HubError(f"push needs huggingface_hub (pip install huggingface_hub): {exc}") from None
    api = HfApi()
    message = commit_message or (f"counterfactory {version.dataset}@{version.label} "
                                 f"(content id {version.info.get('content_id', '')[:12]})")
    try:
        api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)
        uploader = getattr(api, "upload_large_folder", None) if large else None
        if large and uploader is None:
            raise HubError("this huggingface_hub has no upload_large_folder; push without --large")
        if uploader is not None:
            # resumable, many commits; it returns nothing, so the revision is read back
            uploader(repo_id=repo_id, folder_path=str(version.path), repo_type="dataset",
                     revision=revision, ignore_patterns=IGNORE)
            oid = api.dataset_info(repo_id, revision=revision).sha
        else:
            info = api.upload_folder(repo_id=repo_id, folder_path=str(version.path), repo_type="dataset",
                                     revision=revision, ignore_patterns=IGNORE, commit_message=message)
            oid = info.oid
    except HFValidationError as exc:  # a malformed repo id: the client checks it before any request
        raise HubError(f"{repo_id!r} is not a repo id (user/name): {str(exc).splitlines()[0]}") from None
    except OfflineModeIsEnabled:
        raise HubError("the Hugging Face Hub is unreachable: HF_HUB_OFFLINE is set (unset it to push); "
                       "nothing pushed") from None
    except HfHubHTTPError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise HubError(f"the Hub refused the push to {repo_id}: {first}") from None
    except OSError as exc:  # no network, DNS, TLS: requests' errors are OSErrors
        raise HubError(f"could not reach the Hugging Face Hub: {type(exc).__name__}: {exc}".splitlines()[0]) from None
    record = {"repo_id": repo_id, "repo_type": "dataset", "revision": oid, "branch": revision or "main",
              "private": private, "pushed": V.now_utc()}
    info = dict(version.info)
    info["hub"] = [*info.get("hub", []), record]
    version.folder.write_bytes(VERSION_FILE, json.dumps(info, indent=2, sort_keys=True).encode())
    version.info = info
    return record
