"""Pack tokenized samples into rows of ``max_seq_len`` tokens without attention across samples.

    sample A: a a a a a          sample B: b b b         sample C: c c c c
    packed row (max_seq_len 12), longest first:
        input_ids     a a a a a c c c c b b b
        position_ids  0 1 2 3 4 0 1 2 3 0 1 2       (restart per sample)
        seq_lens      [5, 4, 3]
        attention     block-diagonal causal: c never sees a, b never sees a or c

Samples are packed first-fit decreasing within each batch given to ``pack`` (longest first, each
into the first row with room), which fills rows far better than packing in arrival order (see
docs/benchmarks.md); the unused tail of a row is padding (label -100, its own attention block).
The result depends only on the samples and their order, so packing is deterministic. The sample
boundaries travel as the position ids alone; attention.py turns them into what each attention
kernel needs (FlashAttention-2 varlen, a FlexAttention block mask, or the exact 4D mask).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from agentflan_ray.training.tokenize import IGNORE


@dataclass
class PackedRow:
    input_ids: list[int] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    position_ids: list[int] = field(default_factory=list)
    seq_lens: list[int] = field(default_factory=list)
    padding: int = 0

    def add(self, input_ids: list[int], labels: list[int]) -> None:
        # The first token of a sample is never a target: it would be predicted from the previous
        # sample's last token. (It is a BOS or a role header, which carries no label anyway.)
        self.labels += [IGNORE, *labels[1:]] if labels else []
        self.input_ids += input_ids
        self.position_ids += list(range(len(input_ids)))
        self.seq_lens.append(len(input_ids))

    def pad_to(self, length: int, pad_id: int) -> PackedRow:
        missing = length - len(self.input_ids)
        if missing > 0:
            self.input_ids += [pad_id] * missing
            self.labels += [IGNORE] * missing
            self.position_ids += list(range(missing))
            self.seq_lens.append(missing)
            self.padding = missing
        return self


def pack(samples: Iterable[tuple[list[int], list[int]]], max_seq_len: int, pad_id: int) -> Iterator[PackedRow]:
    """Rows of exactly ``max_seq_len`` tokens, first-fit decreasing; each sample must already fit."""
    samples = list(samples)
    for input_ids, _ in samples:
        if len(input_ids) > max_seq_len:
            raise ValueError(f"a sample of {len(input_ids)} tokens does not fit max_seq_len={max_seq_len}")
    rows: list[PackedRow] = []
    for i in sorted(range(len(samples)), key=lambda i: -len(samples[i][0])):  # stable: ties keep their order
        input_ids, labels = samples[i]
        row = next((r for r in rows if len(r.input_ids) + len(input_ids) <= max_seq_len), None)
        if row is None:
            row = PackedRow()
            rows.append(row)
        row.add(input_ids, labels)
    for row in rows:
        yield row.pad_to(max_seq_len, pad_id)


def padding_share(rows: list[PackedRow]) -> float:
    total = sum(len(r.input_ids) for r in rows)
    return sum(r.padding for r in rows) / total if total else 0.0
