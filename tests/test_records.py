"""Records: a vocabulary checked on construction, values that transforms copy instead of changing,
and trajectories that cross a Ray Data boundary and come back equal."""

import dataclasses
import json
from pathlib import Path

import pyarrow as pa
import pytest

from agentflan_ray.reading.agentflan import parse_agentflan
from agentflan_ray.reading.agentinstruct import parse_agentinstruct
from agentflan_ray.reading.sharegpt import parse_sharegpt
from agentflan_ray.reading.toolbench import parse_toolbench
from agentflan_ray.records import (
    TRAJECTORY_SCHEMA,
    Message,
    RecordError,
    Sample,
    trajectory_from_row,
    trajectory_to_row,
)

FIXTURES = Path(__file__).parent / "fixtures"


def real_trajectories() -> list:
    """Every usable record of the bundled real samples, one trajectory kind each reader."""
    found = []
    for path in sorted((FIXTURES / "toolbench/answer").glob("*/*.json")):
        try:
            found.append(parse_toolbench(json.loads(path.read_text()), "toolbench", path.stem)[0])
        except RecordError:
            continue
    for path in sorted((FIXTURES / "agentinstruct").glob("*.json")):
        found += [parse_agentinstruct(r, "agentinstruct", r["id"]) for r in json.loads(path.read_text())]
    for path in sorted((FIXTURES / "sharegpt").glob("*.json")):
        value = json.loads(path.read_text())
        for i, record in enumerate(value if isinstance(value, list) else [value]):
            found.append(parse_sharegpt(record, "sharegpt", f"{path.stem}-{i}"))
    for record in json.loads((FIXTURES / "agentflan/openmanus_sample_raw.json").read_text()):
        found.append(parse_agentflan(record, "agentflan", record["id"]))
    return found


def test_trajectories_cross_a_ray_data_boundary_and_come_back_equal(ray_session):
    import ray

    trajectories = real_trajectories()
    assert {type(t).__name__ for t in trajectories} == {"ToolTrajectory", "EnvTrajectory", "Conversation"}
    table = pa.Table.from_pylist([trajectory_to_row(t) for t in trajectories], schema=TRAJECTORY_SCHEMA)
    # Through Ray Data and back, the way an LLM stage receives them: rebuilt on a worker, re-encoded.
    moved = ray.data.from_arrow(table).map(lambda row: trajectory_to_row(trajectory_from_row(row))).take_all()
    assert [trajectory_from_row(row) for row in moved] == trajectories
    calls = [s.call for t in trajectories if type(t).__name__ == "ToolTrajectory" for s in t.steps if s.call]
    assert calls and any(c.arguments for c in calls)


@pytest.mark.parametrize("fields, reason", [
    ({"role": "tool", "content": "x"}, "unknown_role"),
    ({"role": "assistant", "content": "x", "capability": "planning"}, "unknown_capability"),
    ({"role": "user", "content": ["not", "text"]}, "wrong_type"),
])
def test_a_message_outside_the_vocabulary_is_a_record_error(fields, reason):
    with pytest.raises(RecordError) as info:
        Message(**fields)
    assert info.value.reason == reason


def test_records_are_values():
    message = Message("assistant", "x", loss=True, capability="reasoning")
    with pytest.raises(dataclasses.FrozenInstanceError):
        message.loss = False
    assert dataclasses.replace(message, loss=False).loss is False and message.loss is True
    with pytest.raises(ValueError, match="stream 'everything'"):
        Sample("a", "s", "a", "everything", [message])
