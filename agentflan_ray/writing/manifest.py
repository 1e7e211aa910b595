"""The manifest: written last, it is what makes a job's output complete, auditable and consumable.

    start_output      a rerun first removes the old manifest: from then on the output is incomplete
    ... the job writes its shards (writing/shards.py) ...
    finish_output     removes the parts of the job's own folders that this run did not write, then
                      writes ``manifest.json``: the job, its counts (every input row accounted for),
                      every file it wrote with its rows, the resolved config and the versions
    read_manifest     what a consuming job calls: no manifest, or another job's, is a clear error
    listed_files      exactly the files the manifest lists (a stray part beside them is ignored)
"""

from __future__ import annotations

import json
import platform
import posixpath
import re
from importlib import metadata

import pyarrow.fs as pafs

from agentflan_ray.config import config_hash, config_to_dict
from agentflan_ray.storage import StorageConfig, filesystem, fs_path, join
from agentflan_ray.writing.shards import QUARANTINE, remove_stale_parts

MANIFEST = "manifest.json"
FORMAT_VERSION = 2
PACKAGES = ("agentflan-ray", "ray", "pyarrow", "torch", "transformers", "deepspeed", "openai")
USERINFO = re.compile(r"(?<=://)[^/@\s]+@")


class IncompleteOutput(FileNotFoundError):
    """A job's output without its manifest: interrupted, still being written, or not that job's."""


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def redacted_config(config) -> dict:
    """The resolved config, with any ``user:password@`` in a URL removed."""
    text = json.dumps(config_to_dict(config), sort_keys=True)
    return json.loads(USERINFO.sub("", text))


def build_manifest(job: str, config, tally, **sections) -> dict:
    """The manifest of a run: ``config`` is the job's config dataclass (None for outputs written by
    tools), ``tally`` its accounting (writing/accounting.py), ``sections`` the job's own figures."""
    return {
        "format_version": FORMAT_VERSION,
        "job": job,
        "counts": tally.counts(),
        **sections,
        "files": [{"path": p, "rows": n} for p, n in sorted(tally.files.items())],
        "config": redacted_config(config) if config is not None else None,
        "config_hash": config_hash(config) if config is not None else None,
        "versions": package_versions(),
    }


def start_output(root: str, storage: StorageConfig) -> None:
    """An output without a manifest is incomplete: drop the old one before rewriting anything."""
    fs, base = filesystem(root, storage)
    path = posixpath.join(base, MANIFEST)
    if fs.get_file_info(path).type == pafs.FileType.File:
        fs.delete_file(path)


def finish_output(root: str, storage: StorageConfig, folders, manifest: dict) -> list[str]:
    """Remove the stale parts of this job's folders, then write the manifest; the removed paths."""
    written = {entry["path"] for entry in manifest["files"]}
    removed = remove_stale_parts(root, storage, folders, written)
    fs, base = filesystem(root, storage)
    fs.create_dir(base, recursive=True)
    with fs.open_output_stream(posixpath.join(base, MANIFEST)) as out:
        out.write(json.dumps(manifest, indent=2, ensure_ascii=False).encode() + b"\n")
    return removed


def read_manifest(root: str, storage: StorageConfig, job: str | None = None) -> dict:
    """The manifest of a finished output of ``job``; ``IncompleteOutput`` naming what is missing."""
    fs, base = filesystem(root, storage)
    path = posixpath.join(base, MANIFEST)
    what = f"`{job}` output" if job else "job output"
    info = fs.get_file_info(path)
    if info.type != pafs.FileType.File:
        exists = fs.get_file_info(base).type == pafs.FileType.Directory
        why = ("the job that writes it did not finish (it writes its manifest last), or is still running; "
               "rerun it" if exists else "nothing is there")
        raise IncompleteOutput(f"{join(root, MANIFEST)} not found: {root} is not a finished {what}: {why}")
    with fs.open_input_stream(path) as f:
        manifest = json.loads(f.read())
    found = manifest.get("job", "generate")  # format 1 manifests came from generate only
    if job and found != job:
        raise IncompleteOutput(f"{root} is a `{found}` output, not a {what}")
    return manifest


def listed_files(root: str, manifest: dict, exclude_folders: tuple[str, ...] = ()) -> list[str]:
    """Full paths (as ``filesystem`` understands them) of the files the manifest lists, in order."""
    base = fs_path(root)
    paths = []
    for entry in manifest["files"]:
        if entry["path"].split("/", 1)[0] not in exclude_folders:
            paths.append(posixpath.join(base, entry["path"]))
    return paths


# The outputs that hold training samples, and which of their folders do (a folder is a stream).
SAMPLE_FOLDERS = {"generate": None, "negatives": ("negative",)}  # None: every folder but quarantine


def sample_files(output: str, storage: StorageConfig) -> list[tuple[str, str, int]]:
    """``(stream, path, rows)`` of every sample shard a finished `generate` or `negatives` output lists, in
    its order (quarantine, dropped cases and the held-out Agent-H set excluded)."""
    manifest = read_manifest(output, storage)
    job = manifest.get("job", "generate")
    if job not in SAMPLE_FOLDERS:
        raise IncompleteOutput(f"{output} is a `{job}` output, not training samples (a generate or negatives output)")
    keep = SAMPLE_FOLDERS[job]
    rows = {posixpath.join(fs_path(output), entry["path"]): entry["rows"] for entry in manifest["files"]}
    files = [(path.rsplit("/", 2)[-2], path, rows[path])
             for path in listed_files(output, manifest, exclude_folders=(QUARANTINE,))]
    files = [file for file in files if keep is None or file[0] in keep]
    if not files:
        raise FileNotFoundError(f"{output}: its manifest lists no sample shards (every record was quarantined?)")
    return files


def sample_shards(output: str, storage: StorageConfig) -> list[str]:
    """The paths of ``sample_files``."""
    return [path for _, path, _ in sample_files(output, storage)]


def write_output(root: str, storage: StorageConfig, job: str, rows: dict[str, list[dict]], schema,
                 source: str = "rows", folders=None) -> dict:
    """A complete job output from rows held in memory (``{folder: rows}``; tests, benchmarks, small
    tools): deterministic shards, then the manifest, as the job itself would leave it."""
    from agentflan_ray.writing.accounting import Tally
    from agentflan_ray.writing.shards import ShardWriter

    start_output(root, storage)
    writer = ShardWriter(root, storage, schema)
    tally = Tally()
    for folder, folder_rows in rows.items():
        for row in folder_rows:
            writer.add(folder, row)
            tally.read(source)
            tally.outcome(source, "quarantined" if folder == QUARANTINE else "written",
                          row.get("reason", "") if folder == QUARANTINE else "")
    tally.files = writer.close()
    manifest = build_manifest(job, None, tally)
    finish_output(root, storage, folders if folders is not None else rows.keys(), manifest)
    return manifest
