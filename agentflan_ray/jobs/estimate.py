"""`generate --estimate`: what `rewrite: llm` would cost, from the real prompts of a sample; no API call.

    agentflan-ray generate --config my.yaml rewrite=llm --estimate [estimate_records=200]

Steps: list the input as the job would (read tasks) -> read the first records of evenly spaced
file pieces until ``estimate_records`` -> parse and align them as the job does -> build the exact
rewrite request of every sample that would be rewritten -> count tokens (characters / 4, as the
budget and the simulator do) -> project to the whole input by bytes (records per byte of the
sampled pieces; Parquet by its row count) -> price with ``llm.prices``; time at ``llm.rpm``/``tpm``.
Re-asks are not in the figures: each re-asked share adds about that share again.
"""

from __future__ import annotations

import json
import math
from collections import Counter

import pyarrow.parquet as pq

from agentflan_ray.aligning.align import align, held_out_for_eval
from agentflan_ray.aligning.prompts import PROMPT_VERSION, Prose, build_messages
from agentflan_ray.aligning.rewrite import context_of, render
from agentflan_ray.llm.client import resolve_endpoint
from agentflan_ray.llm.settings import cost, price_per_1k
from agentflan_ray.reading.decode import iter_raw_records
from agentflan_ray.reading.parse import parse_record
from agentflan_ray.reading.plan import FileRange, plan_read_tasks
from agentflan_ray.reading.turns import record_id
from agentflan_ray.records import RecordError
from agentflan_ray.storage import filesystem


def estimate_tokens(text: str) -> int:
    return (len(text) + 3) // 4


def estimate(config, log=print) -> dict:
    from agentflan_ray.jobs.generate import rewritable

    tasks, unmatched = plan_read_tasks(config)
    if unmatched:
        raise FileNotFoundError("inputs: " + "; ".join(f"{path} matched no file" for path in unmatched))
    pieces = [p for t in tasks for p in t.ranges if not p.problem]
    chosen = pieces[:: max(1, len(pieces) // max(config.estimate_records, 1))][: config.estimate_records]
    per_piece = max(1, math.ceil(config.estimate_records / max(len(chosen), 1)))
    records = requests = prompt_tokens = completion_tokens = 0
    piece_records_sum = piece_bytes_sum = 0.0
    notes: Counter = Counter()
    for piece in chosen:
        taken, taken_bytes, exhausted = 0, 0, True
        for raw in iter_raw_records(piece, config):
            if taken == per_piece:
                exhausted = False
                break
            taken, taken_bytes = taken + 1, taken_bytes + raw.size
            for messages in rewrite_requests(raw, piece, config, notes, rewritable):
                requests += 1
                prompt_tokens += estimate_tokens(json.dumps(messages, sort_keys=True, ensure_ascii=False))
                drafts = [draft for _, _, draft in json.loads(messages[1]["content"])["pieces"]]
                completion_tokens += estimate_tokens(json.dumps({"pieces": drafts}, ensure_ascii=False))
        records += taken
        piece_records_sum += piece_records(piece, config, taken, taken_bytes, exhausted)
        piece_bytes_sum += piece.size
    total_bytes = sum(p.size for p in pieces)
    projected = round(piece_records_sum * total_bytes / max(piece_bytes_sum, 1))  # records per byte, sampled
    scale = projected / max(records, 1)
    _, model = resolve_endpoint(config.llm)
    price = price_per_1k(config.llm.prices, model)
    usage = {"prompt_tokens": round(prompt_tokens * scale), "completion_tokens": round(completion_tokens * scale)}
    result = {
        "sampled": {"records": records, "pieces": len(chosen), "of_pieces": len(pieces), "requests": requests},
        "input_bytes": total_bytes, "model": model, "prompt_version": PROMPT_VERSION,
        "projected": {"records": projected, "requests": round(requests * scale), **usage,
                      "cost_usd": round(cost(usage, price), 2)},
        "price_per_1k": price,
        "minutes": minutes(round(requests * scale), usage, config.llm.rpm, config.llm.tpm),
    }
    log_estimate(result, log)
    return result


def rewrite_requests(raw, piece: FileRange, config, notes: Counter, rewritable) -> list[list[dict]]:
    """The rewrite requests one source record would make, built exactly as the job builds them."""
    if raw.error:
        return []
    try:
        trajectory = parse_record(piece.format, raw.value, piece.source, record_id(raw.value, raw.where), notes)
        if held_out_for_eval(trajectory, config):  # kept for the eval suites: never rewritten
            return []
        samples = align(trajectory, config)
    except (RecordError, RecursionError):
        return []
    requests = []
    for sample in samples:
        if rewritable(trajectory, sample):
            recorder = Prose()
            render(trajectory, sample.stream, config.seed, recorder)
            asked = [p for p in recorder.pieces if p.template.strip()]
            if asked:
                requests.append(build_messages(context_of(trajectory), asked))
    return requests


def piece_records(piece: FileRange, config, taken: int, taken_bytes: int, exhausted: bool) -> float:
    """Records in a file piece: counted when read to its end, Parquet's row count, else by bytes."""
    if exhausted:
        return taken
    if piece.kind == "parquet":
        fs, _ = filesystem(piece.uri, config.storage)
        with fs.open_input_file(piece.path) as f:
            return pq.ParquetFile(f).metadata.num_rows
    return taken * piece.size / max(taken_bytes, 1)


def minutes(requests: int, usage: dict, rpm: int, tpm: int) -> dict:
    limits = {}
    if rpm:
        limits["at_rpm"] = round(requests / rpm, 1)
    if tpm:
        limits["at_tpm"] = round((usage["prompt_tokens"] + usage["completion_tokens"]) / tpm, 1)
    return limits


def log_estimate(result: dict, log) -> None:
    sampled, projected, price = result["sampled"], result["projected"], result["price_per_1k"]
    log(f"[generate --estimate] sampled {sampled['records']:,} records from {sampled['pieces']:,} of "
        f"{sampled['of_pieces']:,} file pieces ({result['input_bytes']:,} bytes in all); no API call made")
    log(f"  projected: {projected['records']:,} records -> {projected['requests']:,} rewrite requests "
        f"({result['model']}, prompt {result['prompt_version']})")
    per = max(projected["requests"], 1)
    log(f"  tokens: {projected['prompt_tokens']:,} prompt + {projected['completion_tokens']:,} completion "
        f"(about {projected['prompt_tokens'] // per:,} + {projected['completion_tokens'] // per:,} per request)")
    log(f"  cost: ${projected['cost_usd']:,.2f} at ${price['input']}/${price['output']} per 1k tokens "
        "(re-asks not included)")
    if result["minutes"]:
        log("  time: " + ", ".join(f"at least {m:,} min {k.replace('at_', 'at the ')} limit"
                                   for k, m in result["minutes"].items()))
    else:
        log("  time: set llm.rpm / llm.tpm to your limits for a time estimate")
