"""Every row that enters a job, accounted for: one tally and one progress line for every job.

Per source, every row read ends as exactly one of ``written`` (it produced output), ``quarantined``
(bad input, with a reason), ``dead_lettered`` (a request that failed for good, with a reason) or
``held_out`` (good input kept out of the output on purpose: `generate`'s ``eval_holdout``), so
``read == written + quarantined + dead_lettered + held_out`` holds per source and in total; the
manifest carries the counts and a job whose counts do not add up exits non-zero. ``held_out`` is
listed only by a run that held a row out, so every other manifest reads as it always has.
Job-specific counters (samples per stream, tokens, cache hits) ride along in ``extra``. Tallies of
parallel tasks travel as JSON and merge on the driver.
"""

from __future__ import annotations

import json
import sys
import time
from collections import Counter, defaultdict

OUTCOMES = ("written", "quarantined", "dead_lettered", "held_out")
ALWAYS_LISTED = ("written", "quarantined", "dead_lettered")


class Tally:
    def __init__(self):
        self.records: dict[str, Counter] = defaultdict(Counter)  # source -> read / outcome -> n
        self.reasons: dict[str, Counter] = defaultdict(Counter)  # source -> reason -> n
        self.extra: dict[str, Counter] = defaultdict(Counter)  # name -> key -> n
        self.files: dict[str, int] = {}  # relative path -> rows

    def read(self, source: str, n: int = 1) -> None:
        self.records[source]["read"] += n

    def outcome(self, source: str, outcome: str, reason: str = "", n: int = 1) -> None:
        if outcome not in OUTCOMES:
            raise ValueError(f"unknown outcome {outcome!r}")
        self.records[source][outcome] += n
        if reason:
            self.reasons[source][reason] += n

    def to_json(self) -> str:
        return json.dumps({"records": self.records, "reasons": self.reasons, "extra": self.extra, "files": self.files})

    def merge(self, text: str) -> None:
        data = json.loads(text)
        for source, counts in data["records"].items():
            self.records[source].update(counts)
        for source, counts in data["reasons"].items():
            self.reasons[source].update(counts)
        for name, counts in data["extra"].items():
            self.extra[name].update(counts)
        self.files.update(data["files"])

    def total(self, key: str) -> int:
        return sum(counts[key] for counts in self.records.values())

    def counts(self) -> dict:
        """The manifest's ``counts``: totals, per source, per reason."""
        keys = ("read", *(o for o in OUTCOMES if o in ALWAYS_LISTED or self.total(o)))
        per_reason: Counter = Counter()
        for counts in self.reasons.values():
            per_reason.update(counts)
        return {
            **{k: self.total(k) for k in keys},
            "per_source": {s: {k: c[k] for k in keys} for s, c in sorted(self.records.items())},
            "per_reason": dict(sorted(per_reason.items())),
            "per_source_reason": {s: dict(sorted(c.items())) for s, c in sorted(self.reasons.items())},
        }


def all_accounted(counts: dict) -> bool:
    """A manifest's ``counts``: every row read ended written, quarantined, dead-lettered or held out,
    per source."""
    return all(c["read"] == sum(c.get(o, 0) for o in OUTCOMES) for c in counts["per_source"].values())


class Progress:
    """One line at most every ``every_s`` seconds and at the end: what is done, the rate, what failed.
    ``detail(tally)`` adds the job's own figures."""

    def __init__(self, job: str, total: int, unit: str, log, enabled: bool, detail=None, every_s: float = 2.0):
        self.job, self.total, self.unit, self.log, self.enabled = job, total, unit, log, enabled
        self.detail, self.every_s = detail, every_s
        self.done = 0
        self.started = self.last = time.monotonic()

    def update(self, tally: Tally, done: int = 1) -> None:
        self.done += done
        now = time.monotonic()
        if self.enabled and (now - self.last >= self.every_s or self.done == self.total):
            self.last = now
            read = tally.total("read")
            rate = read / max(now - self.started, 1e-9)
            line = (f"[{self.job}] {self.done:,}/{self.total:,} {self.unit} · {read:,} rows · {rate:,.0f} rows/s · "
                    f"{tally.total('quarantined'):,} quarantined · {tally.total('dead_lettered'):,} dead letters")
            if tally.total("held_out"):
                line += f" · {tally.total('held_out'):,} held out"
            self.log(line + (f" · {self.detail(tally)}" if self.detail else ""))
            sys.stdout.flush()
