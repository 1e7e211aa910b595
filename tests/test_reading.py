"""Source parsers on the real sample records and on broken ones."""

import json
import os
from collections import Counter
from pathlib import Path

import pytest

from agentflan_ray.config import load_config
from agentflan_ray.jobs.generate import GenerateConfig
from agentflan_ray.reading.agentflan import parse_agentflan
from agentflan_ray.reading.agentinstruct import parse_agentinstruct
from agentflan_ray.reading.decode import iter_raw_records
from agentflan_ray.reading.listing import list_input
from agentflan_ray.reading.plan import ReadTask, plan_read_tasks
from agentflan_ray.reading.sharegpt import parse_sharegpt
from agentflan_ray.reading.toolbench import parse_toolbench
from agentflan_ray.records import RecordError
from agentflan_ray.storage import StorageConfig

FIXTURES = Path(__file__).parent / "fixtures"
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


def toolbench_files():
    return sorted((FIXTURES / "toolbench" / "answer").glob("*/*.json"))


def test_toolbench_sample_keeps_six_trees_and_names_why_four_are_dropped():
    kept, reasons, removed = [], Counter(), 0
    for path in toolbench_files():
        try:
            trajectory, n = parse_toolbench(json.loads(path.read_text()), "toolbench", path.name)
            kept.append(path.parent.name + "/" + path.name.split("_")[0])
            removed += n
        except RecordError as exc:
            reasons[exc.reason] += 1
    assert len(kept) == 6
    assert reasons == {"toolbench_give_up": 3, "toolbench_invalid_data": 1}
    assert removed == 2  # G1/57 and G2/52 end in a path after a DFSDT retry


def test_toolbench_trajectory_shape():
    record = json.loads((FIXTURES / "toolbench/answer/G1_answer/10_ChatGPT_DFS_woFilter_w2.json").read_text())
    t, _ = parse_toolbench(record, "toolbench", "g1-10")
    assert [s.call.name for s in t.steps] == ["transitaires_for_transitaires", "transitaire_for_transitaires", "Finish"]
    assert t.steps[1].call.arguments == {"is_id": "ACT_AGENCE_CALEDONIENNE_DE_TRANSIT"}
    assert t.steps[0].observation.startswith('{"error": "", "response": "[{')
    assert t.final_answer.startswith("The contact details")
    assert t.query.startswith("Can you retrieve") and "Begin!" not in t.query
    assert {f["name"] for f in t.tools} >= {"transitaire_for_transitaires", "transitaires_for_transitaires"}


def test_retry_preface_never_reaches_the_trajectory():
    record = json.loads((FIXTURES / "toolbench/answer/G1_answer/57_ChatGPT_DFS_woFilter_w2.json").read_text())
    t, removed = parse_toolbench(record, "toolbench", "g1-57")
    assert removed == 1
    assert all("not the first time" not in (s.thought + (s.observation or "")) for s in t.steps)
    # The text-only assistant turn before Finish becomes part of Finish's thought.
    assert t.steps[-1].call.name == "Finish" and "unable to retrieve" in t.steps[-1].thought


def broken_toolbench():
    good = json.loads((FIXTURES / "toolbench/answer/G1_answer/10_ChatGPT_DFS_woFilter_w2.json").read_text())

    def variant(mutate):
        record = json.loads(json.dumps(good))
        mutate(record["answer_generation"])
        return record

    def bad_args(ag):
        ag["train_messages"][-1][2]["function_call"]["arguments"] = "{not json"

    def no_observation(ag):
        del ag["train_messages"][-1][3]

    def wrong_type(ag):
        ag["train_messages"][-1][1]["content"] = ["a", "list"]

    def arguments(text):
        return variant(lambda ag: ag["train_messages"][-1][2]["function_call"].update(arguments=text))

    def query(value):
        return variant(lambda ag: ag["train_messages"][-1][1].update(content=value))

    return [
        ({}, "missing_field"),
        ([], "wrong_type"),
        ({"answer_generation": "text"}, "wrong_type"),
        (variant(lambda ag: ag.update(train_messages=[])), "empty_trajectory"),
        (variant(lambda ag: ag.update(train_messages=[[]])), "empty_trajectory"),
        (variant(lambda ag: ag["train_messages"].append({"role": "user"})), "wrong_type"),
        (variant(bad_args), "unparseable_arguments"),
        (variant(no_observation), "roles_out_of_order"),
        (variant(wrong_type), "wrong_type"),
        (variant(lambda ag: ag.update(function="nope")), "wrong_type"),
        (query(12345), "wrong_type"),
        (arguments('{"x": NaN}'), "unparseable_arguments"),
        (arguments('{"x": ' + "9" * 5000 + "}"), "unparseable_arguments"),
        (arguments("[" * 5000 + "]" * 5000), "too_deep"),
        (arguments('{"x": ' + "[" * 5000 + "]" * 5000 + "}"), "too_deep"),
        (arguments('{"x": "\\udc00"}'), "not_utf8"),
    ]


@pytest.mark.parametrize("record, reason", broken_toolbench())
def test_broken_toolbench_records_get_a_reason(record, reason):
    with pytest.raises(RecordError) as info:
        parse_toolbench(record, "toolbench", "x")
    assert info.value.reason == reason


def test_agentinstruct_both_schemas_and_the_acknowledgement_is_not_trained():
    envs = Counter()
    for path in sorted((FIXTURES / "agentinstruct").glob("*.json")):
        for row in json.loads(path.read_text()):
            t = parse_agentinstruct(row, "agentinstruct", row["id"])
            envs[t.env] += 1
            assert t.messages[0].role == "user" and not t.messages[0].loss
            if t.env != "mind2web":
                assert t.messages[1].loss is False
            assert all(m.loss is False for m in t.messages if m.role != "assistant")
    assert envs == {env: 5 for env in ("os", "db", "alfworld", "webshop", "kg", "mind2web")}


def test_agentinstruct_original_loss_flags_are_kept():
    row = json.loads((FIXTURES / "agentinstruct/alfworld.json").read_text())[0]
    t = parse_agentinstruct(row, "agentinstruct", row["id"])
    assert [m.loss for m in t.messages[:4]] == [False, False, False, True]


def test_agentinstruct_environment_from_the_instruction_when_the_id_is_opaque():
    row = json.loads((FIXTURES / "agentinstruct/db.json").read_text())[0]
    assert parse_agentinstruct(row, "agentinstruct", "row-17").env == "db"
    with pytest.raises(RecordError, match="unknown_environment"):
        parse_agentinstruct({"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "OK"},
                                               {"from": "human", "value": "x"}, {"from": "gpt", "value": "y"}]},
                            "agentinstruct", "row-1")


@pytest.mark.parametrize("loss_key", ["loss", "type", None])
def test_agentflan_release_rows_read_leniently(loss_key):
    turns = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]
    if loss_key == "loss":
        for turn, loss in zip(turns, [False, False, True], strict=True):
            turn["loss"] = loss
    elif loss_key == "type":
        for turn in turns:
            turn["type"] = "text"
    row = {"id": "toolbench_tflan_cot_30p_1", "conversation": turns}
    c = parse_agentflan(row, "agentflan", row["id"])
    assert c.stream == "tflan_cot"
    assert [m.loss for m in c.messages] == [False, False, True]


def test_agentflan_sample_file_streams():
    rows = json.loads((FIXTURES / "agentflan/openmanus_sample_raw.json").read_text())
    streams = [parse_agentflan(r, "agentflan", r["id"]).stream for r in rows]
    assert sorted(streams) == ["agentflan", "agentflan", "agentflan", "instruct", "tflan_cot"]


def test_sharegpt_list_and_single_object():
    rows = json.loads((FIXTURES / "sharegpt/dialogstudio_sharegpt_original_example.json").read_text())
    single = json.loads((FIXTURES / "sharegpt/axolotl_tests_fixtures_conversation.json").read_text())
    for row in [*rows, single]:
        c = parse_sharegpt(row, "sharegpt", row.get("id", "single"))
        assert c.messages[0].role == "user" and c.messages[-1].role == "assistant"
        assert all(m.loss == (m.role == "assistant") for m in c.messages)


@pytest.mark.parametrize(
    "row, reason",
    [
        ({"conversations": []}, "empty_trajectory"),
        ({"conversations": "text"}, "wrong_type"),
        ({"conversations": [{"from": "gpt", "value": "hi"}]}, "roles_out_of_order"),
        ({"conversations": [{"from": "human", "value": "a"}, {"from": "human", "value": "b"}]}, "roles_out_of_order"),
        ({"conversations": [{"from": "alien", "value": "a"}]}, "unknown_role"),
        ({"conversations": [{"from": "human", "value": 3}]}, "wrong_type"),
        ({"chat": []}, "missing_field"),
        ("just a string", "wrong_type"),
    ],
)
def test_broken_chats_get_a_reason(row, reason):
    with pytest.raises(RecordError) as info:
        parse_sharegpt(row, "sharegpt", "x")
    assert info.value.reason == reason


def test_agentinstruct_turns_whose_whitespace_would_stall_the_action_parser_are_refused():
    row = json.loads((FIXTURES / "agentinstruct/os.json").read_text())[0]
    row["conversations"][3]["content"] = "Think: a" + " " * 50_000 + "b"
    with pytest.raises(RecordError) as info:
        parse_agentinstruct(row, "agentinstruct", row["id"])
    assert info.value.reason == "unparseable_action"


def listing(uri) -> dict[str, tuple[str, int]]:
    return {entry.name: (entry.problem, entry.size) for entry in list_input(str(uri), StorageConfig())}


def test_listing_reports_loops_pipes_and_directories_instead_of_walking_into_them(tmp_path):
    root = tmp_path / "in"
    (root / "sub").mkdir(parents=True)
    (root / "ok.json").write_text("{}")
    (root / "sub" / "deep.json").write_text("{}")
    (root / "_hidden.json").write_text("{}")
    (root / "sub" / "loop").symlink_to("..")
    (root / "up").symlink_to(tmp_path)
    (root / "self.json").symlink_to("self.json")
    (root / "dangling.json").symlink_to(tmp_path / "missing.json")
    os.mkfifo(root / "pipe.json")
    (root / "dir.json").mkdir()
    traps = {"sub/loop": ("symlink_loop", 0), "up": ("symlink_loop", 0), "self.json": ("symlink_loop", 0),
             "dangling.json": ("unreadable_file", 0), "pipe.json": ("not_a_file", 0)}
    files = {"ok.json": ("", 2), "sub/deep.json": ("", 2)}
    assert listing(f"{root}/**/*.json") == {**files, **traps, "dir.json": ("not_a_file", 0)}
    assert listing(root) == {**files, **traps}  # a directory input: its subdirectories are just walked
    # Without `**` nothing below the glob's depth is walked, loops included.
    assert listing(f"{root}/*.json") == {"ok.json": ("", 2), "self.json": ("symlink_loop", 0),
                                         "dangling.json": ("unreadable_file", 0), "pipe.json": ("not_a_file", 0),
                                         "dir.json": ("not_a_file", 0)}
    assert listing(root / "pipe.json") == {"pipe.json": ("not_a_file", 0)}
    with pytest.raises(FileNotFoundError, match="input not found"):
        list_input(str(root / "missing.json"), StorageConfig())


def test_a_linked_directory_is_listed_once(tmp_path):
    data, other = tmp_path / "data", tmp_path / "other"
    (data / "v1").mkdir(parents=True)
    other.mkdir()
    (data / "v1" / "a.json").write_text("{}")
    (other / "b.json").write_text("{}")
    (data / "latest").symlink_to(data / "v1")  # already listed: reported, not read twice
    (data / "shared").symlink_to(other)  # outside the input: followed
    (data / "shared_again").symlink_to(other)
    assert listing(data) == {"v1/a.json": ("", 2), "shared/b.json": ("", 2), "latest": ("symlink_loop", 0),
                             "shared_again": ("symlink_loop", 0)}


def test_a_file_name_that_is_not_utf8_is_reported_not_read(tmp_path):
    (tmp_path / os.fsdecode(b"bad\xff.json")).write_text("{}")
    assert listing(tmp_path) == {"bad\ufffd.json": ("not_utf8", 0)}


@pytest.mark.skipif(IS_ROOT, reason="root lists a directory whatever its mode")
def test_an_unreadable_directory_is_reported(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    (locked / "a.json").write_text("{}")
    locked.chmod(0)
    try:
        assert listing(tmp_path) == {"locked": ("unreadable_file", 0)}
    finally:
        locked.chmod(0o755)


def test_plan_makes_reported_entries_pieces_that_are_never_opened(tmp_path):
    (tmp_path / "empty.jsonl").write_bytes(b"")
    os.mkfifo(tmp_path / "pipe.json")
    (tmp_path / "ok.json").write_text("[]")
    config = load_config(GenerateConfig, None, [f'inputs=[{{format: sharegpt, path: "{tmp_path}/*.json*"}}]'])
    tasks, unmatched = plan_read_tasks(config)
    pieces = {piece.name: piece for task in tasks for piece in ReadTask.from_row(task.to_row()).ranges}
    assert not unmatched
    assert {name: piece.problem for name, piece in pieces.items()} == {
        "empty.jsonl": "empty_file", "ok.json": "", "pipe.json": "not_a_file"}
    # Reading the pipe would block forever: the piece yields its one record without opening it.
    assert [(r.where, r.error) for r in iter_raw_records(pieces["pipe.json"], config)] == [("pipe.json", "not_a_file")]
