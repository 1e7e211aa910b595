"""The streaming decoders: every unit of a file comes out as a value or a quarantine reason."""

import io
import json

import pytest

from agentflan_ray.reading.decode import read_json_values, read_jsonl_range

LIMIT = 1 << 20


def values(text: bytes, limit=LIMIT):
    return list(read_json_values(io.BytesIO(text), "f.json", limit))


def test_array_items_stream_one_by_one():
    records = values(json.dumps([{"id": i} for i in range(1000)], indent=2).encode())
    assert [r.value["id"] for r in records] == list(range(1000))
    assert not any(r.error for r in records)


def test_single_object_and_concatenated_objects():
    assert [r.value for r in values(b' {"a": 1} ')] == [{"a": 1}]
    assert [r.value for r in values(b'{"a": 1}\n{"a": 2}\n')] == [{"a": 1}, {"a": 2}]


def test_values_larger_than_the_read_chunk():
    big = {"text": "x" * (3 << 20)}
    records = values(json.dumps([big, {"b": 1}]).encode(), limit=8 << 20)
    assert records[0].value == big and records[1].value == {"b": 1}


def test_truncated_array_keeps_the_complete_items_and_quarantines_the_rest():
    text = json.dumps([{"id": 1}, {"id": 2}, {"id": 3}])[:-8].encode()
    records = values(text)
    assert [r.value for r in records[:2]] == [{"id": 1}, {"id": 2}]
    assert records[-1].error == "invalid_json"
    assert len(records) == 3


def test_binary_garbage_is_one_error():
    records = values(bytes(range(256)) * 100)
    assert len(records) == 1 and records[0].error in ("not_utf8", "invalid_json")


def test_record_over_the_limit_is_quarantined_and_reading_continues():
    text = json.dumps([{"a": "y" * 5000}, {"b": 2}]).encode()
    records = values(text, limit=1024)
    assert records[0].error == "record_too_large"
    assert records[1].value == {"b": 2}


def test_empty_file_yields_nothing():
    assert values(b"") == [] and values(b"  \n") == []


JSONL = b"".join(json.dumps({"i": i, "pad": "z" * (i % 7)}).encode() + b"\n" for i in range(200))


@pytest.mark.parametrize("cut", [1, 17, 64, 333, 1000])
def test_jsonl_ranges_cover_every_line_exactly_once(cut):
    seen = []
    for start in range(0, len(JSONL), cut):
        end = min(start + cut, len(JSONL))
        seen += [r.value["i"] for r in read_jsonl_range(io.BytesIO(JSONL), "f.jsonl", start, end, LIMIT)]
    assert seen == list(range(200))


def test_jsonl_bad_lines_are_quarantined_one_by_one():
    text = b'{"ok": 1}\n{"broken": \n\xff\xfe\n' + b'{"long": "' + b"a" * 3000 + b'"}\n{"ok": 2}\n'
    records = list(read_jsonl_range(io.BytesIO(text), "f.jsonl", 0, None, 1024))
    assert [r.error or r.value["ok"] for r in records] == [1, "invalid_json", "not_utf8", "record_too_large", 2]
