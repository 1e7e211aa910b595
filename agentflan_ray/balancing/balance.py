"""Capability balancing by loss masking, and the trained-token counts that show its effect.

Every turn stays in the text, so the model still sees the context; a turn labelled with a
capability keeps its loss with probability ``ratios[capability]``, decided by a hash of
(seed, sample id, turn index) so reruns mask the same turns.
"""

from __future__ import annotations

from collections import Counter

from agentflan_ray.aligning.split import unit_hash
from agentflan_ray.records import Sample

UNLABELLED = "unlabelled"


def estimate_tokens(text: str) -> int:
    """A tokenizer-free estimate (about four characters a token for English and code)."""
    return (len(text) + 3) // 4


def trained_tokens(sample: Sample) -> Counter:
    counts: Counter = Counter()
    for message in sample.messages:
        if message.role == "assistant" and message.loss:
            counts[message.capability or UNLABELLED] += estimate_tokens(message.content)
    return counts


def balance_sample(sample: Sample, ratios: dict[str, float], seed: int) -> None:
    for index, message in enumerate(sample.messages):
        ratio = ratios.get(message.capability or "")
        if message.role != "assistant" or not message.loss or ratio is None or ratio >= 1.0:
            continue
        message.loss = unit_hash(seed, sample.id, index, "balance") < ratio
