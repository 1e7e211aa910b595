"""Deterministic choices: every random decision is a hash of (seed, record id, purpose), so the
same config and input always give the same streams, protocols, phrasings and loss masks."""

from __future__ import annotations

import hashlib
import random


def unit_hash(seed: int, *keys: object) -> float:
    """A number in [0, 1) fixed by the seed and keys."""
    text = "\x1f".join([str(seed), *map(str, keys)])
    digest = hashlib.blake2b(text.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def rng_for(seed: int, *keys: object) -> random.Random:
    return random.Random(int(unit_hash(seed, *keys) * 2**53))


def pick_share(value: float, shares: dict[str, float]) -> str:
    """The name whose cumulative share interval contains ``value``."""
    total = 0.0
    last = None
    for name, share in shares.items():
        if share <= 0:
            continue
        total += share
        last = name
        if value < total:
            return name
    return last


def held_out(seed: int, trajectory_id: str, share: float) -> bool:
    """Whether a ToolBench trajectory is kept out of training for the `tool_call` / `instruct` eval
    suites: `generate` (`eval_holdout`) skips exactly the ones `eval-sets` builds from."""
    return unit_hash(seed, trajectory_id, "eval-holdout") < share
