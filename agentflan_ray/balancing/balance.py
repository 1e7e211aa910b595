"""Capability balancing by loss masking, and the trained-token counts that show its effect.

Every turn stays in the text, so the model still sees the context; a turn labelled with a
capability keeps its loss with probability ``ratios[capability]``, decided by a hash of
(seed, sample id, turn index) so reruns mask the same turns.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from dataclasses import dataclass, field
from typing import Literal

from agentflan_ray.aligning.split import unit_hash
from agentflan_ray.config import ConfigError
from agentflan_ray.records import Sample

BALANCE_PRESETS = {
    "none": {"reasoning": 1.0, "retrieval": 1.0, "understanding": 1.0},
    "paper": {"reasoning": 1.0, "retrieval": 0.25, "understanding": 0.75},
    "r10r5u7": {"reasoning": 1.0, "retrieval": 0.5, "understanding": 0.7},
}


@dataclass
class BalanceConfig:
    """Capability balancing by loss masking: a turn keeps its loss with probability ratio[capability]."""

    preset: Literal["none", "paper", "r10r5u7"] = "r10r5u7"
    # Overrides single ratios of the preset, e.g. {retrieval: 0.3}.
    ratios: dict = field(default_factory=dict)

    def validate(self, key: str) -> None:
        for name, value in self.ratios.items():
            if name not in BALANCE_PRESETS["none"]:
                raise ConfigError(f"{key}.ratios.{name}: unknown capability; use one of {sorted(BALANCE_PRESETS['none'])}")
            if not isinstance(value, int | float) or isinstance(value, bool) or not 0.0 <= value <= 1.0:
                raise ConfigError(f"{key}.ratios.{name}: must be a number within [0, 1], got {value!r}")

    def resolved(self) -> dict[str, float]:
        return {**BALANCE_PRESETS[self.preset], **{k: float(v) for k, v in self.ratios.items()}}


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


def balance_sample(sample: Sample, ratios: dict[str, float], seed: int) -> Sample:
    """The sample with each capability-labelled assistant turn's loss kept with probability
    ``ratios[capability]``; the given sample is not changed."""
    messages = []
    for index, message in enumerate(sample.messages):
        ratio = ratios.get(message.capability or "")
        if message.role == "assistant" and message.loss and ratio is not None and ratio < 1.0:
            message = dataclasses.replace(message, loss=unit_hash(seed, sample.id, index, "balance") < ratio)
        messages.append(message)
    return dataclasses.replace(sample, messages=messages)
