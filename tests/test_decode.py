"""The streaming decoders: every unit of a file comes out as a value or a quarantine reason."""

import gzip
import io
import json
import random
import tracemalloc

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from agentflan_ray.reading.decode import CHUNK, read_json_values, read_jsonl_range, read_parquet_rows
from agentflan_ray.reading.jsontext import ValueEnd

LIMIT = 1 << 20


def values(text: bytes, limit=LIMIT):
    return list(read_json_values(io.BytesIO(text), "f.json", limit))


def test_array_items_stream_one_by_one():
    records = values(json.dumps([{"id": i} for i in range(1000)], indent=2).encode())
    assert [r.value["id"] for r in records] == list(range(1000))
    assert [r.where for r in records] == [f"f.json#{i}" for i in range(1000)]  # where each one came from


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


def test_a_file_of_only_whitespace_is_one_empty_file_record():
    for text in (b"", b"  \n\t"):
        assert [(r.where, r.error) for r in values(text)] == [("f.json", "empty_file")]
    assert values(b"[]") == []  # an empty array is a well-formed file with no records


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


def lines(text: bytes, limit=LIMIT, start=0, end=None):
    return list(read_jsonl_range(io.BytesIO(text), "f.jsonl", start, end, limit))


def outcome(records):
    return [r.error or r.value for r in records]


def test_an_item_that_does_not_decode_is_skipped_and_reading_resumes():
    assert outcome(values(b'[{"a": 1}, {bad}, nul, {"b": 2}]')) == [{"a": 1}, "invalid_json", "invalid_json", {"b": 2}]
    assert outcome(values(b'{"a": 1}\n{bad}\n{"b": 2}')) == [{"a": 1}, "invalid_json", {"b": 2}]
    # Past a bare token that is not JSON nothing can be trusted: the file ends there.
    assert outcome(values(b'{"a": 1} <html> {"b": 2}')) == [{"a": 1}, "invalid_json"]


def test_bytes_that_are_not_utf8_spoil_only_their_record():
    text = '[{"a": "café"}, {"b": 2}]'.encode("latin-1")
    assert outcome(values(text)) == ["not_utf8", {"b": 2}]
    assert outcome(lines(b'{"a": "\xc0\xaf"}\n{"b": 2}\n')) == ["not_utf8", {"b": 2}]


@pytest.mark.parametrize("raw, reason", [
    (b'{"a": NaN}', "invalid_json"),
    (b'{"a": -Infinity}', "invalid_json"),
    (b'{"a": 1e999}', "invalid_json"),
    (b'{"a": ' + b"1" * 10_000 + b"}", "invalid_json"),
    (b"[" * 100_000 + b"]" * 100_000, "too_deep"),
    (b'{"a": ' + b"[" * 5000 + b"]" * 5000 + b"}", "too_deep"),
    (b'{"a": "\\ud800"}', "not_utf8"),
    (b'{"a": "x\x00y"}', "invalid_json"),
], ids=["nan", "infinity", "float_overflow", "10000_digits", "100000_deep", "5000_deep", "lone_surrogate", "raw_nul"])
def test_what_python_json_lets_through_or_raises_on_is_named(raw, reason):
    assert outcome(values(b"[" + raw + b', {"ok": 1}]')) == [reason, {"ok": 1}]
    assert outcome(lines(raw + b'\n{"ok": 1}\n')) == [reason, {"ok": 1}]


def test_surrogate_pairs_and_escaped_backslashes_are_fine():
    text = b'[{"a": "\\ud83d\\ude00"}, {"a": "\\\\ud800"}]'
    assert outcome(values(text)) == [{"a": "\U0001F600"}, {"a": "\\ud800"}]


def test_duplicate_keys_keep_the_last_value():
    assert outcome(values(b'[{"a": 1, "a": 2}]')) == [{"a": 2}]


@pytest.mark.parametrize("data", [
    gzip.compress(b'[{"a": 1}]'),
    b"PK\x03\x04" + bytes(100),
    '[{"a": 1}]'.encode("utf-16"),
    b"PAR1" + bytes(100),
], ids=["gzip", "zip", "utf16", "parquet"])
def test_compressed_binary_and_utf16_files_are_one_not_utf8_record(data):
    for records in (values(data), lines(data)):
        assert [(r.where[:7], r.error) for r in records] in ([("f.json", "not_utf8")], [("f.jsonl", "not_utf8")])


def test_a_utf8_byte_order_mark_is_accepted():
    assert outcome(values(b'\xef\xbb\xbf[{"a": 1}]')) == [{"a": 1}]
    assert outcome(lines(b'\xef\xbb\xbf{"a": 1}\n{"b": 2}\n')) == [{"a": 1}, {"b": 2}]


def test_a_number_cut_by_the_read_buffer_is_read_whole():
    text = ("[" + json.dumps({"pad": "x" * (CHUNK - 20)}) + ", 123456789012345]").encode()
    assert [r.value for r in values(text, limit=4 * CHUNK)][1:] == [123456789012345]


def test_an_oversized_value_streams_past_without_being_held():
    text = b'[{"a": "' + b"x" * (24 << 20) + b'"}, {"b": 2}]'
    stream = io.BytesIO(text)
    del text
    tracemalloc.start()
    records = list(read_json_values(stream, "f.json", 1 << 20))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert outcome(records) == ["record_too_large", {"b": 2}]
    assert records[0].size > 24 << 20 and len(records[0].preview) == 2000
    assert peak < 8 << 20  # the 1 MiB limit, a read chunk and copies of them: never the 24 MB value


def test_a_value_over_the_limit_in_bytes_but_not_in_characters():
    text = json.dumps([{"a": "€" * 2000}, {"b": 2}], ensure_ascii=False).encode()  # 6000 bytes, 2000 characters
    assert outcome(values(text, limit=4096)) == ["record_too_large", {"b": 2}]


def test_a_range_inside_a_giant_line_reads_no_further_than_its_end():
    text = b'{"ok": 1}\n{"a": "' + b"x" * (8 << 20) + b'"}\n{"ok": 2}\n'
    stream = io.BytesIO(text)
    assert list(read_jsonl_range(stream, "f.jsonl", 1 << 20, 2 << 20, LIMIT)) == []
    assert stream.tell() <= (2 << 20) + CHUNK
    assert [r.error or r.value["ok"] for r in lines(text, start=0, end=1 << 20)] == [1, "record_too_large"]
    assert [r.value["ok"] for r in lines(text, start=2 << 20)] == [2]


def test_a_jsonl_file_of_blank_lines_is_one_empty_file_record():
    assert [(r.where, r.error) for r in lines(b"\n  \n\n")] == [("f.jsonl", "empty_file")]
    assert lines(b"\n  \n\n", start=0, end=3) == []  # one range of a split file cannot tell


def parquet_bytes(table: pa.Table) -> bytes:
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    return buffer.getvalue()


def test_parquet_rows_over_the_limit_or_not_utf8_are_one_record_each():
    table = pa.table({"text": ["small", "y" * 5000, "small again"]})
    records = list(read_parquet_rows(io.BytesIO(parquet_bytes(table)), "f.parquet", 1024))
    assert outcome(records) == [{"text": "small"}, "record_too_large", {"text": "small again"}]
    offsets = pa.array([0, 2, 4], pa.int32()).buffers()[1]
    bad = pa.Array.from_buffers(pa.string(), 2, [None, offsets, pa.py_buffer(b"ok\xff\xfe")])
    records = list(read_parquet_rows(io.BytesIO(parquet_bytes(pa.table({"text": bad}))), "f.parquet", LIMIT))
    assert outcome(records) == [{"text": "ok"}, "not_utf8"]


def test_a_truncated_parquet_file_is_one_record():
    data = parquet_bytes(pa.table({"text": ["a"] * 1000}))
    records = list(read_parquet_rows(io.BytesIO(data[: len(data) // 2]), "f.parquet", LIMIT))
    assert [(r.where, r.error) for r in records] == [("f.parquet", "invalid_parquet")]


def random_value(rng: random.Random, depth: int = 0):
    if depth > 4 or rng.random() < 0.3:
        return rng.choice(['a"b', "x" * rng.randint(0, 40), "\\", 1, -2.5e3, None, True, "é😀", "\n" * 30])
    if rng.random() < 0.5:
        return [random_value(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    return {f'k{i}"': random_value(rng, depth + 1) for i in range(rng.randint(0, 4))}


def test_value_end_finds_the_decoders_end_however_the_text_is_cut():
    rng = random.Random(7)
    for _ in range(1000):
        text = json.dumps(random_value(rng), ensure_ascii=rng.random() < 0.5)
        _, expected = json.JSONDecoder().raw_decode(text + " ,")
        scanner, scanned, end = ValueEnd(), 0, None
        for cut in [*sorted(rng.sample(range(1, len(text) + 1), min(3, len(text)))), len(text) + 2]:
            end = scanner.feed((text + " ,")[:cut], scanned) if scanned < cut else None
            scanned = cut
            if end is not None:
                break
        assert end == expected, text
