"""The tool_call and instruct suites built from the bundled ToolBench records: a case per held-out
call with the recorded name and arguments, instruct prompts whose answers parse back, a stable
held-out share, and the eval-sets command that wrote the shipped demo sets."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from agentflan_ray.aligning.split import held_out
from agentflan_ray.aligning.toolbench import qualified_name, render_instruct
from agentflan_ray.cli import main
from agentflan_ray.evaluating.build import build_sets, read_toolbench, write_sets
from agentflan_ray.evaluating.judge import find_call, format_call, same_call
from agentflan_ray.evaluating.sets import BadCase, check_case, read_sets
from agentflan_ray.storage import StorageConfig

REPO = Path(__file__).resolve().parent.parent
TOOLBENCH = str(REPO / "tests/fixtures/toolbench/**/*.json")


def recorded(step) -> dict:
    return {"name": qualified_name(step.call.name), "arguments": step.call.arguments}


def trajectories() -> dict:
    return {t.id: t for t in read_toolbench([TOOLBENCH], StorageConfig(), Counter())}


def test_a_tool_call_case_per_call_of_every_held_out_trajectory():
    cases, counts = build_sets([TOOLBENCH], ("tool_call",), seed=0, holdout_share=1.0)
    calls = [(t, i) for t in trajectories().values() for i, step in enumerate(t.steps) if step.call.name != "Finish"]
    assert len(cases) == len(calls) == 17 and counts["cases"] == {"tool_call": 17}
    assert counts["records_left_out"] == {"toolbench_invalid_data": 1, "toolbench_give_up": 3}
    for case, (t, i) in zip(cases, calls, strict=True):
        assert (case["source_id"], case["step"], case["protocol"]) == (t.id, i, "general")
        assert case["expect"] == recorded(t.steps[i])
        offered = [tool["function"]["name"] for tool in case["tools"]]
        assert case["expect"]["name"] in offered and "Finish" not in offered
        messages = case["messages"]
        assert [m["role"] for m in messages] == ["system", "user"] + ["assistant", "user"] * i
        assert messages[1]["content"] == t.query
        for k in range(i):  # each earlier call parses back from its turn, its observation verbatim after it
            assert same_call(find_call(messages[2 + 2 * k]["content"], offered), recorded(t.steps[k]), offered) == (True, True)
            assert messages[3 + 2 * k]["content"] == t.steps[k].observation
        assert "Action Input" not in messages[0]["content"]  # the aligned prompt: tools, no format


def test_instruct_cases_ask_for_a_recorded_call_in_a_protocol_that_parses_back():
    by_id = trajectories()
    cases, counts = build_sets([TOOLBENCH], ("instruct",), seed=5, holdout_share=1.0)
    assert len(cases) == len(by_id) == 6 and counts["cases_left_out"] == {}
    assert Counter(case["format"] for case in cases) == {"json": 3, "goal": 3}
    for case in cases:
        t = by_id[case["source_id"]]
        *prompt, answer = render_instruct(t, 5).messages
        assert case["messages"] == [{"role": m.role, "content": m.content} for m in prompt]
        assert case["expect"] in [recorded(step) for step in t.steps]
        assert case["protocol"] == case["format"]
        offered = [tool["function"]["name"] for tool in case["tools"]]
        assert same_call(format_call(answer.content, case["format"]), case["expect"], offered) == (True, True)
        other = {"json": "goal", "goal": "json"}[case["format"]]
        assert not format_call(answer.content, other).called


def test_held_out_is_a_stable_seeded_share_of_trajectory_ids():
    ids = [f"answer/G1_answer/{i}.json#0" for i in range(2000)]
    chosen = [i for i in ids if held_out(0, i, 0.2)]
    assert 300 < len(chosen) < 500 and chosen == [i for i in ids if held_out(0, i, 0.2)]
    assert set(chosen) <= {i for i in ids if held_out(0, i, 0.5)}  # a larger share only adds
    assert chosen != [i for i in ids if held_out(1, i, 0.2)]
    assert build_sets([TOOLBENCH], holdout_share=0.0)[0] == []
    some, counts = build_sets([TOOLBENCH], holdout_share=0.5)
    assert 0 < counts["held_out"] < 6
    assert {c["source_id"] for c in some} == {t for t in trajectories() if held_out(0, t, 0.5)}


def test_a_limit_keeps_a_seeded_spread_in_input_order():
    everything, _ = build_sets([TOOLBENCH], ("tool_call",), holdout_share=1.0)
    limited, _ = build_sets([TOOLBENCH], ("tool_call",), holdout_share=1.0, limit=5)
    assert len(limited) == 5 and limited == build_sets([TOOLBENCH], ("tool_call",), holdout_share=1.0, limit=5)[0]
    order = [everything.index(case) for case in limited]
    assert order == sorted(order) and len({case["source_id"] for case in limited}) > 1


def test_eval_sets_wrote_the_shipped_demo_sets(tmp_path, capsys):
    for suite in ("tool_call", "instruct"):
        out = tmp_path / f"{suite}.jsonl"
        assert main(["eval-sets", "--toolbench", TOOLBENCH, "--suite", suite, "--holdout-share", "1", "--seed", "5",
                     "--output", str(out)]) == 0
        assert out.read_bytes() == (REPO / f"jobs/configs/eval_demo_{suite}.jsonl").read_bytes()
        cases, bad, _ = read_sets([str(out)], StorageConfig())
        assert bad == [] and {case["suite"] for case in cases} == {suite}
    assert "6 cases {'instruct': 6} from 6 held-out (seed 5, share 1.0) of 6" in capsys.readouterr().out
    both = tmp_path / "both.jsonl"
    assert main(["eval-sets", "--toolbench", TOOLBENCH, "--output", str(both), "--holdout-share", "1"]) == 0
    assert Counter(json.loads(line)["suite"] for line in both.read_text().splitlines()) == {"tool_call": 17, "instruct": 6}
    assert main(["eval-sets", "--toolbench", str(tmp_path / "none/*.json"), "--output", str(both)]) == 2
    assert "matched no file" in capsys.readouterr().err


def test_write_sets_reads_toolbench_from_and_writes_to_s3(s3_server, s3_bucket):
    import boto3

    s3 = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    for path in (REPO / "tests/fixtures/toolbench").rglob("*.json"):
        s3.upload_file(str(path), s3_bucket, f"in/toolbench/{path.relative_to(REPO / 'tests/fixtures/toolbench')}")
    counts = write_sets([f"s3://{s3_bucket}/in/toolbench/**/*.json"], f"s3://{s3_bucket}/sets/eval.jsonl",
                        StorageConfig(), seed=0, share=0.5)
    body = s3.get_object(Bucket=s3_bucket, Key="sets/eval.jsonl")["Body"].read().decode()
    cases = [json.loads(line) for line in body.splitlines()]
    local, _ = build_sets([TOOLBENCH], seed=0, holdout_share=0.5)
    assert cases == local and counts == dict(Counter(case["suite"] for case in local)) and set(counts) == {"tool_call",
                                                                                                         "instruct"}


def fake_generate_output(root: Path, **eval_holdout) -> str:
    """A finished generate output's manifest, as far as eval-sets reads it."""
    root.mkdir()
    section = {"seed": 3, "share": 0.5, "toolbench_inputs": [TOOLBENCH], **eval_holdout} if eval_holdout else None
    (root / "manifest.json").write_text(json.dumps({"job": "generate", "files": [], "eval_holdout": section}))
    return str(root)


def test_eval_sets_takes_seed_share_and_inputs_from_the_generate_manifest(tmp_path, capsys):
    run = fake_generate_output(tmp_path / "run", held_out_for_eval={"toolbench": 3})
    out = tmp_path / "sets.jsonl"
    assert main(["eval-sets", "--generate-manifest", run, "--output", str(out)]) == 0
    expected = {t for t in trajectories() if held_out(3, t, 0.5)}
    assert expected and expected != set(trajectories())
    assert {json.loads(line)["source_id"] for line in out.read_text().splitlines()} == expected
    assert "(seed 3, share 0.5)" in capsys.readouterr().out
    # Given again by hand they must agree with the run's; a run that held nothing out has no suites.
    assert main(["eval-sets", "--generate-manifest", run, "--output", str(out), "--seed", "3", "--holdout-share", "0.5"]) == 0
    assert main(["eval-sets", "--generate-manifest", run, "--output", str(out), "--seed", "0"]) == 2
    assert "--seed 0 differs from the 3 of the generate run" in capsys.readouterr().err
    assert main(["eval-sets", "--generate-manifest", run, "--output", str(out), "--holdout-share", "0.05"]) == 2
    assert main(["eval-sets", "--generate-manifest", fake_generate_output(tmp_path / "all_trained"),
                 "--output", str(out)]) == 2
    assert "held no ToolBench trajectory out" in capsys.readouterr().err
    assert main(["eval-sets", "--generate-manifest", str(tmp_path / "nothing"), "--output", str(out)]) == 2
    assert main(["eval-sets", "--output", str(out)]) == 2


@pytest.mark.parametrize("change, reason", [
    ({"format": None}, "bad_format"), ({"format": "xml"}, "bad_format"), ({"format": ["json"]}, "bad_format"),
    ({"expect": "no_call"}, "bad_format"), ({"suite": "tool_call", "format": "yaml"}, "bad_format"),
    ({"messages": "[{"}, "bad_json"), ({"expect": {"arguments": {}}}, "bad_expect"),
])
def test_a_broken_instruct_case_is_quarantined_with_its_reason(change, reason):
    good = json.loads((REPO / "jobs/configs/eval_demo_instruct.jsonl").read_text().splitlines()[0])
    assert check_case(good)["format"] == good["format"]
    with pytest.raises(BadCase) as info:
        check_case({**good, **change})
    assert info.value.reason == reason
