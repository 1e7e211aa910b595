"""Inputs built to break a reader, for every format and container, through the generate job.

Each corpus is generated into tmp_path at test time (nothing big is committed), together with the
quarantine reason every bad record must end under. The job runs over it on the shared local Ray with
``task_retries=0``, so a read task that raised would fail the job instead of being retried; a deadline
kills the test run (with every thread's traceback) instead of letting it hang. Every record must be
written or quarantined with exactly the expected reason, per source.
"""

from __future__ import annotations

import faulthandler
import gzip
import io
import json
import os
import subprocess
import sys
import zipfile
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import FIXTURES, REPO

from agentflan_ray.config import load_config
from agentflan_ray.jobs.generate import GenerateConfig, succeeded
from agentflan_ray.jobs.generate import run as generate

FORMATS = ("toolbench", "agentinstruct", "agentflan", "sharegpt")
BIG = 30 << 20  # one JSON string (or Parquet cell) of 30 MB: over the default max_record_bytes (16 MiB)
LINE = 20 << 20  # one JSONL line of 20 MB, the file's last, with no newline
NUMBER = 5 << 20  # one number token of 5 MB
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


@pytest.fixture
def deadline():
    """A hang anywhere (a read task blocked on a pipe, a listing in a link loop) ends the run."""
    faulthandler.dump_traceback_later(240, exit=True)
    yield
    faulthandler.cancel_dump_traceback_later()


# --- valid records, one shape per format; `text` lands in a turn the parser keeps ------------------

def valid_record(fmt: str, i: int, text: str = "") -> dict:
    if fmt == "toolbench":
        call = {"name": "get_weather_for_weather", "arguments": json.dumps({"city": "Paris"})}
        finish = {"name": "Finish", "arguments": json.dumps({"return_type": "give_answer", "final_answer": "Sunny."})}
        return {"query_id": f"tb-{i}", "answer_generation": {
            "valid_data": True,
            "function": [{"name": "get_weather_for_weather", "description": "Weather of a city",
                          "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}},
                         {"name": "Finish", "description": "Finish the task", "parameters": {}}],
            "train_messages": [[
                {"role": "system", "content": "You are AutoGPT. " + text},
                {"role": "user", "content": "What is the weather in Paris?\nBegin!"},
                {"role": "assistant", "content": "I will look it up.", "function_call": call},
                {"role": "function", "name": "get_weather_for_weather", "content": '{"sky": "sunny"}'},
                {"role": "assistant", "content": "It is sunny.", "function_call": finish},
            ]]}}
    if fmt == "agentinstruct":
        row = json.loads((FIXTURES / "agentinstruct/os.json").read_text())[0]
        row["id"] = f"os_{i}"
        row["conversations"][2]["content"] += text
        return row
    if fmt == "agentflan":
        return {"id": f"toolbench_tflan_cot_{i}", "conversation": [
            {"role": "system", "content": "You can call tools."},
            {"role": "user", "content": "Hello? " + text},
            {"role": "assistant", "content": "Hello.", "loss": True}]}
    return {"id": f"sg-{i}", "conversations": [{"from": "human", "value": "Hi " + text},
                                               {"from": "gpt", "value": "Hello."}]}


def turns_key(fmt: str) -> str:
    return {"toolbench": "", "agentinstruct": "conversations", "agentflan": "conversation"}.get(fmt, "conversations")


def wrong_types(fmt: str) -> list[tuple[dict, str]]:
    """Wrong types in the nested places each parser reads, with the reason each must get."""
    def variant(change):
        record = valid_record(fmt, 900 + len(cases))
        change(record)
        return record

    cases: list[tuple[dict, str]] = []
    if fmt == "toolbench":
        def path(record):
            return record["answer_generation"]["train_messages"][-1]

        def arguments(value):
            return lambda r: path(r)[2]["function_call"].update(arguments=value)

        for change, reason in [
            (lambda r: r.update(answer_generation=[1, 2]), "wrong_type"),
            (lambda r: r["answer_generation"].update(train_messages={"0": []}), "wrong_type"),
            (lambda r: r["answer_generation"]["train_messages"].append("not a list"), "wrong_type"),
            (lambda r: r["answer_generation"].update(function={"name": "x"}), "wrong_type"),
            (lambda r: path(r)[1].update(content=12345), "wrong_type"),  # was a TypeError: internal_error
            (lambda r: path(r)[2].update(content=["a", "list"]), "wrong_type"),
            (lambda r: path(r)[2].update(content={"a": "dict"}), "wrong_type"),
            (lambda r: path(r)[2].update(function_call="get_weather"), "wrong_type"),
            (lambda r: path(r)[3].update(content={"sky": "sunny"}), "wrong_type"),
            (arguments(42), "unparseable_arguments"),
            (arguments(["city"]), "unparseable_arguments"),
            (arguments('{"city": NaN}'), "unparseable_arguments"),
            (arguments('{"n": ' + "7" * 10_000 + "}"), "unparseable_arguments"),
            (arguments("[" * 5000 + "]" * 5000), "too_deep"),  # was a RecursionError: internal_error
            (arguments('{"city": "\\ud800"}'), "not_utf8"),  # would have crashed the Parquet writer
            (lambda r: r["answer_generation"].update(train_messages=[[{}] * 100_000]), "wrong_type"),
        ]:
            cases.append((variant(change), reason))
        return cases
    key = turns_key(fmt)
    text_key, role_key = ("content", "role") if fmt != "sharegpt" else ("value", "from")
    for change, reason in [
        (lambda r: r.update({key: {"0": r[key][0]}}), "wrong_type"),
        (lambda r: r.update({key: "a string"}), "wrong_type"),
        (lambda r: r[key][0].update({text_key: ["a", "list"]}), "wrong_type"),
        (lambda r: r[key][1].update({text_key: {"a": "dict"}}), "wrong_type"),
        (lambda r: r[key][0].update({text_key: 7}), "wrong_type"),
        (lambda r: r[key][0].update({role_key: ["user"]}), "unknown_role"),
        (lambda r: r.update({key: [{}] * 100_000}), "unknown_role"),
    ]:
        cases.append((variant(change), reason))
    if fmt == "agentinstruct":  # a whitespace run that the action parsers would take hours over
        cases.append((variant(lambda r: r[key][3].update(content="Think: a" + " " * 200_000 + "b")),
                      "unparseable_action"))
    return cases


def enc(value) -> bytes:
    return json.dumps(value).encode()


def duplicate_first_key(record: dict) -> bytes:
    key = next(iter(record))
    return b"{" + enc(key) + b': ["an earlier value"], ' + enc(record)[1:]


def hostile_items(fmt: str) -> list[tuple[bytes, str]]:
    """(raw JSON text of one record, its reason; "" for a record that must be written)."""
    def good(i, **extra) -> dict:
        return {**valid_record(fmt, i), **extra}

    def with_text(i, raw: bytes) -> bytes:  # a valid record with `raw` spliced into a kept turn's text
        marker = "@@TEXT@@"
        return enc(valid_record(fmt, i, marker)).replace(marker.encode(), raw)

    return [
        (enc(good(1)), ""),
        (duplicate_first_key(good(2)), ""),  # duplicate keys: the last one counts
        (b"[" * 100_000 + b"]" * 100_000, "too_deep"),
        (enc(good(3))[:-1] + b', "meta": ' + b"[" * 5000 + b"]" * 5000 + b"}", "too_deep"),
        (b'"a bare string"', "wrong_type"),
        (b"42", "wrong_type"),
        (b"null", "wrong_type"),
        (b"true", "wrong_type"),
        (enc(good(4))[:-1] + b', "score": NaN}', "invalid_json"),
        (enc(good(5))[:-1] + b', "score": -Infinity}', "invalid_json"),
        (enc(good(6))[:-1] + b', "n": ' + b"1" * 10_000 + b"}", "invalid_json"),
        (with_text(7, b"\\ud800 lone"), "not_utf8"),
        (with_text(8, b"\xc0\xaf overlong"), "not_utf8"),
        (with_text(9, b"caf\xe9 in Latin-1"), "not_utf8"),
        (with_text(10, b"a NUL \x00 byte"), "invalid_json"),
        (b"\x00", "invalid_json"),
        *[(enc(record), reason) for record, reason in wrong_types(fmt)],
        (enc(good(11)), ""),
    ]


class Corpus:
    """Files under one root and what the job must make of them."""

    def __init__(self, root: Path):
        self.root = root
        root.mkdir(parents=True)
        self.reasons: Counter = Counter()
        self.written = 0

    def expect(self, reason: str, n: int = 1) -> None:
        if reason:
            self.reasons[reason] += n
        else:
            self.written += n

    def write(self, name: str, data: bytes) -> Path:
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return path

    def parquet(self, name: str, table: pa.Table) -> bytes:
        buffer = io.BytesIO()
        pq.write_table(table, buffer)
        return self.write(name, buffer.getvalue()).read_bytes()


def write_hostile_corpus(root: Path, fmt: str) -> Corpus:
    corpus = Corpus(root)
    items = hostile_items(fmt)
    # The same units as one JSON array, and as JSON lines: each one read and judged on its own.
    corpus.write("records.json", b"[\n" + b",\n".join(raw for raw, _ in items) + b"\n]")
    corpus.write("records.jsonl", b"\n".join(raw for raw, _ in items) + b"\n")
    for _, reason in items:
        corpus.expect(reason, 2)
    corpus.write("empty_objects.json", b"[" + b",".join([b"{}"] * 20_000) + b"]")
    corpus.expect("missing_field", 20_000)
    write_encodings(corpus, fmt)
    write_parquet_cases(corpus, fmt)
    write_file_system_traps(corpus, fmt)
    return corpus


def write_encodings(corpus: Corpus, fmt: str) -> None:
    array = json.dumps([valid_record(fmt, 20)])
    corpus.write("utf8_bom.json", b"\xef\xbb\xbf" + array.encode())
    corpus.write("utf8_bom.jsonl", b"\xef\xbb\xbf" + enc(valid_record(fmt, 21)) + b"\n")
    corpus.expect("", 2)
    corpus.write("utf16.json", array.encode("utf-16"))
    corpus.write("utf16.jsonl", (json.dumps(valid_record(fmt, 22)) + "\n").encode("utf-16"))
    corpus.write("gzip_renamed.json", gzip.compress(array.encode()))
    corpus.write("gzip_renamed.jsonl", gzip.compress(array.encode()))
    zipped = io.BytesIO()
    with zipfile.ZipFile(zipped, "w") as archive:
        archive.writestr("records.json", array)
    corpus.write("zip_renamed.json", zipped.getvalue())
    corpus.expect("not_utf8", 5)
    corpus.write("truncated.json", array.encode()[:-30])  # no record complete: the file's one row
    corpus.expect("invalid_json")
    corpus.write("garbage.json", b"<html>not json</html>" * 100)
    corpus.expect("invalid_json")


def write_parquet_cases(corpus: Corpus, fmt: str) -> None:
    records = [valid_record(fmt, 30), valid_record(fmt, 31)]
    data = corpus.parquet("valid.parquet", pa.Table.from_pylist(records))
    corpus.expect("", 2)
    corpus.write("truncated.parquet", data[: len(data) // 2])
    corpus.expect("invalid_parquet")
    corpus.parquet("unexpected_schema.parquet", pa.table({"a": [1, 2, 3], "b": [b"x", b"y", b"z"]}))
    corpus.expect("missing_field", 3)
    main = "answer_generation" if fmt == "toolbench" else turns_key(fmt)
    corpus.parquet("wrong_column_type.parquet", pa.table({main: ["a string", "another"]}))
    corpus.expect("wrong_type", 2)
    # A string column holding bytes that are not UTF-8 (Arrow does not check them on write).
    values = b"ok\xff\xfe\xc0\xaf"
    offsets = pa.array([0, 2, 4, 6], pa.int32()).buffers()[1]
    bad = pa.Array.from_buffers(pa.string(), 3, [None, offsets, pa.py_buffer(values)])
    corpus.parquet("not_utf8.parquet", pa.table({"id": bad, main: pa.array([None, None, None], pa.string())}))
    corpus.expect("not_utf8", 2)
    corpus.expect("wrong_type")  # the row that converts has a null where the trajectory should be


def write_file_system_traps(corpus: Corpus, fmt: str) -> None:
    root = corpus.root
    corpus.write("inside/ok.json", enc(valid_record(fmt, 40)))
    corpus.expect("")
    (root / "inside" / "loop").symlink_to("..")  # a loop below a `**` glob
    (root / "up").symlink_to(root.parent)  # a directory above the input root
    (root / "to_root").symlink_to("/")
    (root / "self.json").symlink_to("self.json")  # a link to itself
    corpus.expect("symlink_loop", 4)
    (root / "dangling.json").symlink_to(root / "nowhere.json")
    corpus.expect("unreadable_file")
    os.mkfifo(root / "pipe.json")  # opening it would block forever
    corpus.write("dir.json/inner.json", enc(valid_record(fmt, 41)))  # a directory the glob matches
    corpus.expect("not_a_file", 2)
    corpus.expect("")
    corpus.write(os.fsdecode(b"name\xff.json"), enc(valid_record(fmt, 42)))
    corpus.expect("not_utf8")
    for name in ("empty.json", "empty.jsonl", "empty.parquet"):
        corpus.write(name, b"")
    corpus.write("blank.json", b" \n\t\r\n ")
    corpus.write("blank.jsonl", b"\n\n   \n")
    corpus.expect("empty_file", 5)
    if not IS_ROOT:  # root reads a file whatever its mode
        corpus.write("locked.json", enc(valid_record(fmt, 43))).chmod(0)
        corpus.expect("unreadable_file")


def run_job(tmp_path: Path, roots: dict[str, Path], **overrides) -> dict:
    inputs = ", ".join(f'{{format: {fmt}, path: "{root}/**/*.*"}}' for fmt, root in roots.items())
    settings = [f"inputs=[{inputs}]", f"output={tmp_path / 'out'}", "progress=false", "task_retries=0",
                *(f"{key}={value}" for key, value in overrides.items())]
    return generate(load_config(GenerateConfig, None, settings), log=lambda *_: None)


def check_accounting(manifest: dict, out: Path, corpora: dict[str, Corpus]) -> None:
    assert succeeded(manifest)
    rows = pq.read_table(out / "quarantine").to_pylist()
    assert len(rows) == manifest["counts"]["quarantined"]
    assert all(row["reason"] and row["path"] for row in rows)
    for fmt, corpus in corpora.items():
        counts = manifest["counts"]["per_source"][fmt]
        assert counts["read"] == counts["written"] + counts["quarantined"], fmt
        reasons = Counter(row["reason"] for row in rows if row["source"] == fmt)
        assert reasons == corpus.reasons, fmt
        assert counts["written"] == corpus.written, fmt


@pytest.mark.slow
def test_hostile_corpus_every_format_is_quarantined_with_its_reason(ray_session, tmp_path, deadline):
    corpora = {fmt: write_hostile_corpus(tmp_path / "in" / fmt, fmt) for fmt in FORMATS}
    manifest = run_job(tmp_path, {fmt: corpus.root for fmt, corpus in corpora.items()})
    check_accounting(manifest, tmp_path / "out", corpora)
    rows = pq.read_table(tmp_path / "out" / "quarantine").to_pylist()
    traps = {row["path"]: row["reason"] for row in rows if row["source"] == "sharegpt"}
    assert traps["inside/loop"] == traps["up"] == traps["to_root"] == traps["self.json"] == "symlink_loop"
    assert traps["pipe.json"] == traps["dir.json"] == "not_a_file"
    assert traps["name\ufffd.json"] == "not_utf8"
    assert max(len(row["record"]) for row in rows) <= 2000


def write_gigantic_corpus(root: Path, fmt: str) -> Corpus:
    """A 30 MB string inside otherwise valid records (JSON, Parquet), a 20 MB last line with no
    newline (JSONL), a 5 MB number token; each file also holds a valid record after the giant."""
    corpus = Corpus(root)
    marker = "@@BIG@@"
    big_record = enc(valid_record(fmt, 50, marker)).split(marker.encode())
    with open(root / "big_string.json", "wb") as f:
        f.write(b"[" + big_record[0] + b"x" * BIG + big_record[1] + b", " + enc(valid_record(fmt, 51)) + b"]")
    with open(root / "big_line.jsonl", "wb") as f:
        f.write(enc(valid_record(fmt, 52)) + b"\n" + big_record[0] + b"y" * LINE + big_record[1])
    corpus.parquet("big_cell.parquet", pa.Table.from_pylist([valid_record(fmt, 53, "z" * BIG), valid_record(fmt, 54)]))
    corpus.expect("record_too_large", 3)
    corpus.expect("", 3)
    number = enc(valid_record(fmt, 55))[:-1] + b', "n": ' + b"9" * NUMBER + b"}"
    corpus.write("big_number.json", b"[" + number + b", " + enc(valid_record(fmt, 56)) + b"]")
    corpus.write("big_number.jsonl", number + b"\n" + enc(valid_record(fmt, 57)) + b"\n")
    corpus.expect("invalid_json", 2)
    corpus.expect("", 2)
    return corpus


@pytest.mark.slow
def test_gigantic_tokens_hit_max_record_bytes_and_reading_goes_on(ray_session, tmp_path, deadline):
    corpora = {fmt: write_gigantic_corpus(tmp_path / "in" / fmt, fmt) for fmt in FORMATS}
    manifest = run_job(tmp_path, {fmt: corpus.root for fmt, corpus in corpora.items()})
    check_accounting(manifest, tmp_path / "out", corpora)


MEMORY_PROBE = """
import json, sys
from agentflan_ray.config import load_config
from agentflan_ray.jobs.generate import GenerateConfig, run_read_task
from agentflan_ray.reading.plan import plan_read_tasks

def task(path, out):
    config = load_config(GenerateConfig, None, [f'inputs=[{{format: sharegpt, path: "{path}"}}]', f"output={out}"])
    tasks, _ = plan_read_tasks(config)
    assert len(tasks) == 1, tasks
    return run_read_task(tasks[0].to_row(), config)

def kib(field):
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(field + ":"))

small, big, out = sys.argv[1:4]
task(small, out + "/warm")  # imports, the Parquet writer and zstd warmed up on a small file
open("/proc/self/clear_refs", "w").write("5")  # restart the peak (VmHWM) from the current size
before = kib("VmRSS")
result = task(big, out + "/big")
print(json.dumps({"grew_kib": kib("VmHWM") - before, "stats": json.loads(result["stats"])}))
"""


# Peak memory a read task may add over a 30 MB value. JSON and JSONL: the reader holds at most
# max_record_bytes of it (16 MiB) plus a chunk, and never decodes it. Parquet: Arrow's decoder itself
# holds the page, the dictionary fallback and the array (about 3.5 times the cell, whatever the
# reader's options); the reader only measures the row and never turns it into Python objects.
PEAK_LIMITS = {"big_string.json": 2 * BIG, "big_line.jsonl": 2 * BIG, "big_cell.parquet": 4 * BIG}


@pytest.mark.slow
@pytest.mark.skipif(not os.access("/proc/self/clear_refs", os.W_OK), reason="needs Linux's resettable peak RSS")
def test_a_gigantic_token_is_never_held_whole_by_the_reader(tmp_path):
    """One read task over each 30 MB case in a fresh process, its peak memory measured."""
    corpus = write_gigantic_corpus(tmp_path / "big", "sharegpt")
    small = tmp_path / "small.json"
    small.write_text(json.dumps([valid_record("sharegpt", 1)]))
    for name, limit in PEAK_LIMITS.items():
        result = subprocess.run([sys.executable, "-c", MEMORY_PROBE, str(small), str(corpus.root / name),
                                 str(tmp_path / "out" / name)],
                                capture_output=True, text=True, cwd=REPO, timeout=120)
        assert result.returncode == 0, result.stderr[-3000:]
        report = json.loads(result.stdout.strip().splitlines()[-1])
        assert report["stats"]["reasons"]["sharegpt"] == {"record_too_large": 1}, name
        assert report["grew_kib"] * 1024 < limit, (name, report["grew_kib"] // 1024, "MiB")
