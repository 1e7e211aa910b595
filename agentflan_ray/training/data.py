"""Generated shards -> packed training rows, in Ray Data, before any worker starts.

    read_parquet(the sample shards <data>/manifest.json lists, quarantine excluded)
      + _order = hash(seed, id)        a seeded shuffle that does not depend on read order
      + _group = range of _order       ~512 samples each, decided by the samples alone
      .groupby(_group).map_groups(TokenizeAndPack)
                                       tokenize with the template, pack each group in _order
      .materialize()                   small (token ids only); counted
      .repartition(block_rows)         equal blocks, rows numbered by `row`

Every output batch of TokenizeAndPack carries its counts (samples, skips by reason, trained tokens
by capability, padding) on its first row; a batch in which no sample survives yields one empty
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

from agentflan_ray.storage import filesystem
from agentflan_ray.training.packing import PackedRow, pack
from agentflan_ray.training.tokenize import SkipSample, tokenize_sample
from agentflan_ray.writing.manifest import sample_shards

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
        messages_in_order = batch["messages"]
        if "_order" in batch:  # a packing group, in whatever order the shuffle left its rows
            messages_in_order = [batch["messages"][i] for i in np.argsort(batch["_order"], kind="stable")]
        for messages in messages_in_order:
            messages = [dict(m) for m in messages]
            try:
                tokenized = tokenize_sample(messages, self.tokenizer, self.template, self.max_seq_len, self.overlong)
            except SkipSample as exc:
                skipped[exc.reason] += 1
                continue
            samples.append((tokenized.input_ids, tokenized.labels))
            truncated += tokenized.truncated
            capability.update(tokenized.capability_tokens)
        rows = list(pack(samples, self.max_seq_len, self.pad_id))
        stats = json.dumps({"samples": len(batch["messages"]), "packed": len(samples), "truncated": truncated,
                            "skipped": dict(skipped),
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


def _prepare(config: TrainConfig):
    import ray.data
    from ray.data.expressions import col

    fs, _ = filesystem(config.data, config.storage)
    samples = ray.data.read_parquet(sample_shards(config.data, config.storage), filesystem=fs, columns=["id", "messages"])
    # Packing groups come from the samples' keys, never from Ray's block or batch boundaries (a
    # sort's blocks follow randomly sampled boundaries, so batches would hold other samples on every
    # run, and a rerun that resumes would see other rows).
    groups = max(1, round(samples.count() / PACK_GROUP))
    shuffled = samples.map_batches(shuffle_key, fn_kwargs={"seed": config.seed, "groups": groups},
                                   batch_format="pyarrow")
    packed = shuffled.groupby("_group").map_groups(
        TokenizeAndPack, fn_constructor_kwargs={"model": config.model, "template": config.template,
                                                "max_seq_len": config.max_seq_len, "overlong": config.overlong},
        batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=1),
    ).materialize()
    report = {"samples": 0, "packed": 0, "truncated": 0, "skipped": Counter(), "trained_tokens": Counter(),
              "padding": 0, "tokens": 0}
    for batch in packed.select_columns(["stats"]).iter_batches(batch_format="numpy"):
        for text in batch["stats"]:
            if text:
                stats = json.loads(text)
                for key in ("samples", "packed", "truncated", "padding", "tokens"):
                    report[key] += stats[key]
                report["skipped"].update(stats["skipped"])
                report["trained_tokens"].update(stats["trained_tokens"])
    report["padding_share"] = report["padding"] / report["tokens"] if report["tokens"] else 0.0
    report["skipped"], report["trained_tokens"] = dict(report["skipped"]), dict(report["trained_tokens"])
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
