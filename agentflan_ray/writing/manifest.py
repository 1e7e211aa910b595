"""The manifest: written last, it is what makes an output directory complete and auditable."""

from __future__ import annotations

import json
import platform
import posixpath
import re
from importlib import metadata

import pyarrow.fs as pafs

from agentflan_ray.config import config_hash, config_to_dict
from agentflan_ray.storage import filesystem

PACKAGES = ("agentflan-ray", "ray", "pyarrow", "torch", "transformers", "deepspeed", "openai")
PART = re.compile(r"^part-\d+\.parquet$")
USERINFO = re.compile(r"(?<=://)[^/@\s]+@")


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


def build_manifest(config, tally) -> dict:
    per_source = {source: {k: counts.get(k, 0) for k in ("read", "written", "quarantined")}
                  for source, counts in sorted(tally.records.items())}
    per_reason: dict[str, int] = {}
    for counts in tally.reasons.values():
        for reason, n in counts.items():
            per_reason[reason] = per_reason.get(reason, 0) + n
    total = {k: sum(c[k] for c in per_source.values()) for k in ("read", "written", "quarantined")}
    return {
        "format_version": 1,
        "counts": {
            **total,
            "per_source": per_source,
            "per_reason": dict(sorted(per_reason.items())),
            "per_source_reason": {s: dict(sorted(c.items())) for s, c in sorted(tally.reasons.items())},
        },
        "samples": {"total": sum(tally.samples.values()), "per_stream": dict(sorted(tally.samples.items()))},
        "trained_tokens": {
            "estimate": "characters / 4 of assistant turns with loss",
            "balance_ratios": config.balance.resolved(),
            "before_balancing": dict(sorted(tally.tokens_before.items())),
            "after_balancing": dict(sorted(tally.tokens_after.items())),
        },
        "notes": dict(sorted(tally.notes.items())),
        "files": [{"path": p, "rows": n} for p, n in sorted(tally.files.items())],
        "config": redacted_config(config),
        "config_hash": config_hash(config),
        "versions": package_versions(),
    }


def remove_stale_shards(config, keep: set[str]) -> list[str]:
    """Delete ``part-*.parquet`` files under the output that this run did not write."""
    fs, root = filesystem(config.output, config.storage)
    selector = pafs.FileSelector(root, recursive=True, allow_not_found=True)
    removed = []
    for info in fs.get_file_info(selector):
        if info.type != pafs.FileType.File:
            continue
        relative = posixpath.relpath(info.path.replace("\\", "/"), root.replace("\\", "/"))
        if "/" not in relative or not PART.match(posixpath.basename(relative)):
            continue
        if relative not in keep:
            fs.delete_file(info.path)
            removed.append(relative)
    return removed


def remove_manifest(config) -> None:
    """An output without a manifest is incomplete: drop the old one before rewriting shards."""
    fs, root = filesystem(config.output, config.storage)
    path = posixpath.join(root, "manifest.json")
    if fs.get_file_info(path).type == pafs.FileType.File:
        fs.delete_file(path)


def write_manifest(config, manifest: dict) -> None:
    fs, root = filesystem(config.output, config.storage)
    fs.create_dir(root, recursive=True)
    with fs.open_output_stream(posixpath.join(root, "manifest.json")) as out:
        out.write(json.dumps(manifest, indent=2, sort_keys=False, ensure_ascii=False).encode() + b"\n")


def read_manifest(output: str, storage) -> dict:
    fs, root = filesystem(output, storage)
    with fs.open_input_stream(posixpath.join(root, "manifest.json")) as f:
        return json.loads(f.read())
