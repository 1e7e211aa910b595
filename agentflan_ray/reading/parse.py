"""One raw source record -> its trajectory, by input format."""

from __future__ import annotations

from collections import Counter

from agentflan_ray.reading.agentflan import parse_agentflan
from agentflan_ray.reading.agentinstruct import parse_agentinstruct
from agentflan_ray.reading.sharegpt import parse_sharegpt
from agentflan_ray.reading.toolbench import parse_toolbench


def parse_record(fmt: str, record, source: str, source_id: str, notes: Counter):
    if fmt == "toolbench":
        trajectory, removed = parse_toolbench(record, source, source_id)
        if removed:
            notes["toolbench_retry_preface_removed"] += removed
        return trajectory
    if fmt == "agentinstruct":
        return parse_agentinstruct(record, source, source_id)
    if fmt == "agentflan":
        return parse_agentflan(record, source, source_id)
    if fmt == "sharegpt":
        return parse_sharegpt(record, source, source_id)
    raise ValueError(f"unknown input format {fmt!r}")
