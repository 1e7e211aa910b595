"""Generated shards -> packed training rows, in Ray Data, before any worker starts.

    read_parquet(the sample shards each data root's manifest lists: a generate or negatives output)
      + weigh                          per stream: each sample kept floor(w) times, once more with
                                       probability frac(w) (a seeded hash of its id); `shares` set w
                                       so a stream is that share of all samples; `source` = root:stream
      + _order = hash(seed, id)        a seeded shuffle that does not depend on read order
      + _group = range of _order       ~512 samples each, decided by the samples alone
      .groupby(_group).map_groups(TokenizeAndPack)
                                       tokenize with the template, pack each group in _order
      .materialize()                   small (token ids only); counted
      .repartition(block_rows)         equal blocks, rows numbered by `row`

Every output batch of TokenizeAndPack carries its counts (samples, skips by reason, trained tokens
by capability and by source, padding) on its first row; a batch in which no sample survives yields one empty
row for its counts, dropped after counting. So the report needs no second pass and loses nothing.

Why equal blocks: Ray Train splits the dataset with ``streaming_split(n, equal=True)``, which (order
preserved, locality off) hands each next block to the worker that has received the fewest rows so
far. With equal blocks that is round robin: worker ``r`` of ``n`` gets blocks ``r, r+n, r+2n, ...``.
A block holds ``block_rows`` rows, which divides every worker's share of an optimizer step
(``global_batch / n``) for every world size ``n`` the config allows (for a fixed ``n`` it is that
share: one block per worker per step). So after ``s`` steps the group has consumed exactly the first
``s x global_batch`` rows of the epoch, whatever ``n`` is, and a resume, even on a different number
of workers, skips exactly the rows already trained on. The ``row`` column lets each worker check
that, and the training loop reports any row out of place.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import ray

from agentflan_ray.config import ConfigError
from agentflan_ray.storage import filesystem
from agentflan_ray.training.packing import PackedRow, pack
from agentflan_ray.training.tokenize import SkipSample, tokenize_sample
from agentflan_ray.writing.manifest import sample_files

if TYPE_CHECKING:
    from agentflan_ray.jobs.train import TrainConfig

PACK_GROUP = 512  # samples packed together (first-fit decreasing within each group)


class TokenizeAndPack:
    def __init__(self, model: str, template: str, max_seq_len: int, overlong: str):
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(model)
        self.template, self.max_seq_len, self.overlong = template, max_seq_len, overlong
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id

    def __call__(self, batch: dict) -> dict:
        samples, skipped, capability, truncated = [], Counter(), Counter(), 0
        per_source: dict[str, list[int]] = {}  # source -> [samples, trained tokens]
        order = range(len(batch["messages"]))
        if "_order" in batch:  # a packing group, in whatever order the shuffle left its rows
            order = np.argsort(batch["_order"], kind="stable")
        for i in order:
            messages = [dict(m) for m in batch["messages"][i]]
            counts = per_source.setdefault(str(batch["source"][i]) if "source" in batch else "", [0, 0])
            counts[0] += 1
            try:
                tokenized = tokenize_sample(messages, self.tokenizer, self.template, self.max_seq_len, self.overlong)
            except SkipSample as exc:
                skipped[exc.reason] += 1
                continue
            samples.append((tokenized.input_ids, tokenized.labels))
            truncated += tokenized.truncated
            capability.update(tokenized.capability_tokens)
            counts[1] += sum(tokenized.capability_tokens.values())
        rows = list(pack(samples, self.max_seq_len, self.pad_id))
        stats = json.dumps({"samples": len(batch["messages"]), "packed": len(samples), "truncated": truncated,
                            "skipped": dict(skipped), "sources": per_source,
                            "trained_tokens": dict(capability), "padding": sum(r.padding for r in rows),
                            "tokens": len(rows) * self.max_seq_len})
        if not rows:
            rows = [PackedRow()]  # carries the counts only; dropped after counting

        def column(name: str) -> np.ndarray:
            values = np.empty(len(rows), dtype=object)
            values[:] = [np.array(getattr(r, name), dtype=np.int64) for r in rows]
            return values

        return {
            "input_ids": column("input_ids"),
            "labels": column("labels"),
            "position_ids": column("position_ids"),
            "real_tokens": np.array([len(r.input_ids) - r.padding for r in rows], dtype=np.int64),
            "stats": np.array([stats if i == 0 else "" for i in range(len(rows))], dtype=object),
        }


def shuffle_key(batch: pa.Table, seed: int, groups: int = 1) -> pa.Table:
    """``_order``: a seeded 64-bit hash of the sample id (the shuffle); ``_group``: which of
    ``groups`` equal ranges of that hash it falls in (samples packed together, in ``_order``)."""
    keys = [hashlib.blake2b(f"{seed}:{i}".encode(), digest_size=8).hexdigest() for i in batch.column("id").to_pylist()]
    group = [int(k, 16) * groups >> 64 for k in keys]
    return batch.append_column("_order", pa.array(keys)).append_column("_group", pa.array(group, pa.int64()))


def prepare_dataset(config: TrainConfig):
    """The packed dataset (blocks of ``block_rows`` rows, numbered) and the data report."""
    import ray.data

    context = ray.data.DataContext.get_current()
    preserve_order = context.execution_options.preserve_order
    context.execution_options.preserve_order = True  # the same rows in the same order on every run
    try:
        return _prepare(config)
    finally:
        context.execution_options.preserve_order = preserve_order


def stream_weights(config: TrainConfig, rows: dict[str, int]) -> dict[str, float]:
    """Each stream's weight: ``weights`` (default 1), then ``shares`` solved so that stream is that
    share of all samples after weighting. ``rows``: samples per stream over every root."""
    unknown = sorted((set(config.weights) | set(config.shares)) - set(rows))
    if unknown:
        raise ConfigError(f"weights/shares: no stream {unknown[0]!r} in the data; its streams are {sorted(rows)}")
    weights = {stream: config.weights.get(stream, 1.0) for stream in rows}
    if config.shares:
        rest = sum(rows[s] * weights[s] for s in rows if s not in config.shares)
        if not rest:
            raise ConfigError("shares: every stream has a share; at least one must be weighed by weights instead")
        total = rest / (1 - sum(config.shares.values()))
        for stream, share in config.shares.items():
            weights[stream] = share * total / rows[stream]
    return weights


def data_sources(config: TrainConfig) -> tuple[list[list[tuple[str, str, int]]], dict[str, float]]:
    """Per data root its sample files ``(stream, path, rows)``, and the stream weights."""
    files = [sample_files(root, config.storage) for root in config.roots]
    rows = Counter()
    for root_files in files:
        for stream, _, n in root_files:
            rows[stream] += n
    return files, stream_weights(config, rows)


def weigh(batch: pa.Table, root: int, weights: dict[str, float], seed: int) -> pa.Table:
    """Each sample ``floor(w)`` times and once more with probability ``frac(w)``; a copy's id is
    made unique (``id@root.copy``) so it shuffles apart; ``source`` = ``root:stream``."""
    take, ids, sources = [], [], []
    for i, (sample_id, path) in enumerate(zip(batch.column("id").to_pylist(), batch.column("path").to_pylist(),
                                              strict=True)):
        stream = path.rsplit("/", 2)[-2]
        weight = weights.get(stream, 1.0)
        whole = int(weight)
        if weight > whole:
            draw = int(hashlib.blake2b(f"{seed}:weight:{root}:{sample_id}".encode(), digest_size=8).hexdigest(), 16)
            whole += draw < (weight - int(weight)) * 2**64
        for copy in range(whole):
            take.append(i)
            ids.append(sample_id if root == 0 and copy == 0 else f"{sample_id}@{root}.{copy}")
            sources.append(f"{root}:{stream}")
    table = batch.take(pa.array(take, pa.int64())).drop_columns(["path"])
    return table.set_column(table.schema.get_field_index("id"), "id", pa.array(ids, pa.string())).append_column(
        "source", pa.array(sources, pa.string()))


def _prepare(config: TrainConfig):
    import ray.data
    from ray.data.expressions import col

    files, weights = data_sources(config)
    parts = []
    for root, (uri, root_files) in enumerate(zip(config.roots, files, strict=True)):
        fs, _ = filesystem(uri, config.storage)
        read = ray.data.read_parquet([path for _, path, _ in root_files], filesystem=fs, columns=["id", "messages"],
                                     include_paths=True)
        parts.append(read.map_batches(weigh, fn_kwargs={"root": root, "weights": weights, "seed": config.seed},
                                      batch_format="pyarrow"))
    samples = parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]
    expected = sum(n * weights[stream] for root_files in files for stream, _, n in root_files)
    # Packing groups come from the samples' keys, never from Ray's block or batch boundaries (a
    # sort's blocks follow randomly sampled boundaries, so batches would hold other samples on every
    # run, and a rerun that resumes would see other rows).
    groups = max(1, round(expected / PACK_GROUP))
    shuffled = samples.map_batches(shuffle_key, fn_kwargs={"seed": config.seed, "groups": groups},
                                   batch_format="pyarrow")
    packed = shuffled.groupby("_group").map_groups(
        TokenizeAndPack, fn_constructor_kwargs={"model": config.model, "template": config.template,
                                                "max_seq_len": config.max_seq_len, "overlong": config.overlong},
        batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=1),
    ).materialize()
    report = {"samples": 0, "packed": 0, "truncated": 0, "skipped": Counter(), "trained_tokens": Counter(),
              "padding": 0, "tokens": 0}
    sources = {uri: {stream: {"files_rows": 0, "weight": round(weights[stream], 4), "samples": 0, "trained_tokens": 0}
                     for stream, _, _ in root_files} for uri, root_files in zip(config.roots, files, strict=True)}
    for uri, root_files in zip(config.roots, files, strict=True):
        for stream, _, n in root_files:
            sources[uri][stream]["files_rows"] += n
    for batch in packed.select_columns(["stats"]).iter_batches(batch_format="numpy"):
        for text in batch["stats"]:
            if text:
                stats = json.loads(text)
                for key in ("samples", "packed", "truncated", "padding", "tokens"):
                    report[key] += stats[key]
                report["skipped"].update(stats["skipped"])
                report["trained_tokens"].update(stats["trained_tokens"])
                for source, (count, tokens) in stats["sources"].items():
                    root, stream = source.split(":", 1)
                    entry = sources[config.roots[int(root)]][stream]
                    entry["samples"] += count
                    entry["trained_tokens"] += tokens
    report["padding_share"] = report["padding"] / report["tokens"] if report["tokens"] else 0.0
    report["skipped"], report["trained_tokens"] = dict(report["skipped"]), dict(report["trained_tokens"])
    report["sources"] = sources  # per root and stream: rows listed, weight, samples after weighting, trained tokens
    rows = packed.filter(expr=col("real_tokens") > 0).drop_columns(["stats"])
    blocks = rows.to_arrow_refs()  # in order: preserve_order is on
    counts = ray.get([_num_rows.remote(block) for block in blocks])
    report["rows"] = sum(counts)
    if not report["rows"]:
        return None, report
    offsets = np.cumsum([0, *counts[:-1]]).tolist()
    numbered = ray.data.from_arrow_refs([_number.remote(b, o) for b, o in zip(blocks, offsets, strict=True)])
    return numbered.repartition(target_num_rows_per_block=config.block_rows, strict=True).materialize(), report


@ray.remote(num_cpus=0.25)
def _num_rows(table: pa.Table) -> int:
    return table.num_rows


@ray.remote(num_cpus=0.25)
def _number(table: pa.Table, offset: int) -> pa.Table:
    return table.append_column("row", pa.array(range(offset, offset + table.num_rows), pa.int64()))
