"""Generated shards -> packed training rows, in Ray Data, before any worker starts.

    read_parquet(<data>/<stream>/part-*.parquet, quarantine excluded)
      .map_batches(TokenizeAndPack)   tokenize with the template, pack to max_seq_len
      .materialize()                  small (token ids only); counted, then split equally

Every packed row carries the per-batch counts of the samples it came from in its first row, so the
driver can report samples read, packed and skipped (by reason) without a second pass.
"""

from __future__ import annotations

import json
from collections import Counter

import numpy as np

from agentflan_ray.config import TrainConfig
from agentflan_ray.storage import expand, filesystem
from agentflan_ray.training.packing import pack
from agentflan_ray.training.tokenize import SkipSample, tokenize_sample


class TokenizeAndPack:
    def __init__(self, model: str, template: str, max_seq_len: int, overlong: str):
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(model)
        self.template, self.max_seq_len, self.overlong = template, max_seq_len, overlong
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id

    def __call__(self, batch: dict) -> dict:
        samples, skipped, capability = [], Counter(), Counter()
        for messages in batch["messages"]:
            messages = [dict(m) for m in messages]
            try:
                tokenized = tokenize_sample(messages, self.tokenizer, self.template, self.max_seq_len, self.overlong)
            except SkipSample as exc:
                skipped[exc.reason] += 1
                continue
            samples.append((tokenized.input_ids, tokenized.labels))
            capability.update(tokenized.capability_tokens)
        rows = list(pack(samples, self.max_seq_len, self.pad_id))
        stats = json.dumps({"samples": len(batch["messages"]), "packed": len(samples), "skipped": dict(skipped),
                            "trained_tokens": dict(capability), "padding": sum(r.padding for r in rows),
                            "tokens": len(rows) * self.max_seq_len})
        def column(name: str) -> np.ndarray:
            values = np.empty(len(rows), dtype=object)
            values[:] = [np.array(getattr(r, name), dtype=np.int64) for r in rows]
            return values

        return {
            "input_ids": column("input_ids"),
            "labels": column("labels"),
            "position_ids": column("position_ids"),
            "seq_lens": column("seq_lens"),
            "stats": np.array([stats if i == 0 else "" for i in range(len(rows))], dtype=object),
        }


def shard_paths(config: TrainConfig) -> list[str]:
    files = expand(config.data.rstrip("/") + "/*/part-*.parquet", config.storage)
    paths = [path for path, _, name in files if not name.startswith("quarantine/")]
    if not paths:
        raise FileNotFoundError(f"no sample shards under {config.data}")
    return paths


def prepare_dataset(config: TrainConfig):
    """The packed, materialized dataset and the data report (samples, skips, padding share)."""
    import ray

    fs, _ = filesystem(config.data, config.storage)
    dataset = ray.data.read_parquet(shard_paths(config), filesystem=fs, columns=["messages"])
    packed = dataset.map_batches(
        TokenizeAndPack, fn_constructor_kwargs={"model": config.model, "template": config.template,
                                                "max_seq_len": config.max_seq_len, "overlong": config.overlong},
        batch_size=512, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=1),
    ).materialize()
    report = {"samples": 0, "packed": 0, "skipped": Counter(), "trained_tokens": Counter(), "padding": 0, "tokens": 0}
    for batch in packed.select_columns(["stats"]).iter_batches(batch_format="numpy"):
        for text in batch["stats"]:
            if text:
                stats = json.loads(text)
                for key in ("samples", "packed", "padding", "tokens"):
                    report[key] += stats[key]
                report["skipped"].update(stats["skipped"])
                report["trained_tokens"].update(stats["trained_tokens"])
    report["rows"] = packed.count()
    report["padding_share"] = report["padding"] / report["tokens"] if report["tokens"] else 0.0
    report["skipped"], report["trained_tokens"] = dict(report["skipped"]), dict(report["trained_tokens"])
    return packed.drop_columns(["stats"]), report
