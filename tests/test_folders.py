"""The one folder object: a local folder and one on an object store (fsspec's in-memory store
here) answer the same calls with the same results, ``open_dir`` alone decides which is which,
and versions read through either the same way (a label folder on a store is a version only
once its commit marker is there)."""

from __future__ import annotations

import json
import uuid

import pytest

from counterfactory import versions as V
from counterfactory.layout import Folder, LocalDir, sha256_bytes
from counterfactory.storage import RemoteDir, open_dir


@pytest.fixture(params=["local", "store"])
def folder(request, tmp_path, monkeypatch) -> Folder:
    monkeypatch.setenv("COUNTERFACTORY_CACHE", str(tmp_path / "cache"))
    if request.param == "local":
        return open_dir(tmp_path / "root" / "demo")
    return open_dir(f"memory://{uuid.uuid4().hex}/root/demo")


def test_open_dir_decides_once(tmp_path):
    assert isinstance(open_dir(tmp_path), LocalDir) and open_dir(f"file://{tmp_path}").path == tmp_path
    store = open_dir("memory://b/x")
    assert isinstance(store, RemoteDir) and not store.is_local and open_dir(store) is store
    assert open_dir(str(tmp_path)).is_local


def test_same_answers(folder):
    folder.write_bytes("v1/a.json", b"{}")
    folder.write_bytes("latest", b"v1\n")
    assert folder.read_bytes("v1/a.json") == b"{}" and folder.read_text("latest") == "v1\n"
    assert folder.read_pointer("latest") == "v1\n" and folder.read_pointer("nothing") is None
    assert folder.list() == [("latest", False, 3), ("v1", True, 0)]
    assert folder.sizes(["latest", "gone"]) == {"latest": 3, "gone": None}
    assert folder.exists("v1/a.json") and not folder.exists("v2")
    assert folder.sha256("latest") == sha256_bytes(b"v1\n")
    v1 = folder.child("v1")
    assert (folder.name, v1.name, v1.parent_name) == ("demo", "v1", "demo")
    assert v1.workdir() == folder.workdir() / "v1", "a version's local side lies in its dataset's"
    assert folder.parent().name == "root"
    folder.create("tags/x", b"v1\n")
    assert V.read_tags(folder) == {"x": "v1"}
    if folder.is_local:  # O_EXCL: of two taggers one wins (an object store's PUT cannot tell)
        with pytest.raises(FileExistsError):
            folder.create("tags/x", b"v2\n")
    folder.delete("latest")
    assert not folder.exists("latest")


def test_versions_through_either_folder(folder):
    manifest = json.dumps({"shards": [], "files": {}}).encode()
    for label in ("v1", "v2"):
        folder.write_bytes(f"{label}/manifest.json", manifest)
    folder.write_bytes("v1/version.json", json.dumps({"content_id": sha256_bytes(manifest)}).encode())
    folder.write_bytes("v1/DATASET-000000.tar", b"")
    v1, v2 = V.list_versions(folder)
    assert v1.status() == "complete" and v1.dataset == "demo" and v1.location == folder.child("v1").uri
    # without its commit marker a label folder is a version only where it appeared by a rename
    assert v2.committed == folder.is_local
    assert v2.status() == "complete" if folder.is_local else v2.status().startswith("incomplete")
    assert V.read_latest(folder) == ("v2" if folder.is_local else "v1")
    mirror = V.fetch_mirror(v1).path
    assert (mirror / "manifest.json").read_bytes() == manifest and (mirror / "version.json").is_file()
    assert (mirror / "DATASET-000000.tar").exists() == folder.is_local, "a mirror holds no shards"
