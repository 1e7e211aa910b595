"""Exact and near-duplicate removal for generated queries: MinHash LSH, signatures as in datasketch.

Design (``dedupe``; the first text of every group is kept, in input order)::

    texts ─ normalize ─ blake2b digest ─ seen before? ─ yes: exact duplicate of the first     1. exact
                                                     └ no:  distinct text
    distinct texts, BATCH at a time, in one numpy pass:                                      2. near
        shingles (word 3-grams of the normalized text) ─ crc32 ─ MinHash signatures
            (uint32[num_perm], bit-identical to ``MinHash.bulk(..., hashfunc=zlib.crc32)``, affine32)
        ─ band keys (b bands of r slots, one uint64 per band)
    then each distinct text in input order:
        texts kept so far that share a band key (the LSH candidates)
        ─ estimated Jaccard (share of equal signature slots) >= threshold?
            yes: near duplicate of the most similar one (the earliest on ties)
            no:  kept: its signature appended to the store, its band keys to the buckets

``normalize`` applies Unicode NFKC and casefolds, strips punctuation (Unicode categories P* and
ASCII symbols) at the ends of tokens and collapses white space: "Book a flight!" and "  book A
flight " are exact duplicates, and empty or white-space-only texts are exact duplicates of each
other. An exact copy of a text that turns out to be a near duplicate is paired with the kept text
that near duplicate points at.

What the threshold means for word 3-grams: a query of n words has n-2 shingles. Changing one word
in its middle changes 3 of them: J = (n-5)/(n+1), 15/21 ~ 0.71 for 20 words. An estimate from 64
slots is +-0.06, so such a pair is removed at 0.8 about 8% of the time and at 0.7 about 57% (over
100 seeds); use 0.6 (or num_perm=128) to catch one-word edits reliably. Changing, adding or
dropping a word at either end changes one shingle: J = 17/19 ~ 0.89 for 20 words, caught at 0.8.
Queries of fewer than 3 words are compared as sets of words.

LSH: bands x rows come from datasketch's ``MinHashLSH`` parameter search for the threshold, with
false negatives weighted 9:1 (``LSH_WEIGHTS``) since a false candidate costs one signature
comparison: at 0.8 and 64 permutations, 9 bands of 7 slots make a pair of Jaccard 0.8 a candidate
with probability 0.88 and one of 0.85 with 0.97 (the default weights give 5 x 11: 0.36 and 0.60).
MinHashLSH needs 2 bands, which limits the threshold to about 0.95 at 64 permutations. The buckets
are one dict per band, band key -> row (a list of rows in the rare shared bucket), rather than a
``MinHashLSH``, whose dict storage holds a set per bucket and every key's band keys (for removal):
indexing the 79k distinct queries of the 100k benchmark took it 180 MB and 4.2 s, these dicts
30 MB and 1.1 s. crc32 is a safe shingle hash because the affine scheme premixes every hash with
the MurmurHash3 finalizer, and it is 8x faster than datasketch's default sha1_hash32.

Memory: the input, a 16-byte digest per distinct text (phase 1 only), one uint32 row of
``num_perm`` and ``b`` dict entries per kept text, and one batch of shingle hashes at a time.
``near_duplicate_of`` uses the same two steps to find the texts of one list that duplicate another.
"""

from __future__ import annotations

import hashlib
import itertools
import string
import sys
import unicodedata
import zlib
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from datasketch import MinHash, MinHashLSH

SCHEME = "affine32"
LSH_WEIGHTS = (0.1, 0.9)  # (false positive, false negative): candidates are cheap to verify
BATCH = 4096  # texts per numpy signature pass: ~25 shingles x num_perm x 4 bytes each
MAX_NEAR_PAIRS = 1000

_ASCII_PUNCTUATION = string.punctuation
_PUNCTUATION = _ASCII_PUNCTUATION + "".join(  # Unicode P*, the ASCII symbols ($+<=>^`|~) added
    chr(c) for c in range(128, sys.maxunicode + 1) if unicodedata.category(chr(c)).startswith("P")
)
_NO_SHINGLE = np.uint32(0xFFFFFFFF)  # the slot value of an empty MinHash


def normalize(text: str) -> str:
    """NFKC, casefolded, punctuation stripped from the ends of tokens, single spaces."""
    text = unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", text).casefold())
    punctuation = _ASCII_PUNCTUATION if text.isascii() else _PUNCTUATION  # a short set strips 4x faster
    tokens = (token.strip(punctuation) for token in text.split())
    return " ".join(token for token in tokens if token)


def shingles(text: str) -> set[bytes]:
    """Word 3-grams of the normalized text (its words, under 3 words), UTF-8 encoded."""
    words = normalize(text).encode().split()
    if len(words) < 3:
        return set(words)
    return {b" ".join(gram) for gram in zip(words, words[1:], words[2:], strict=False)}


@dataclass
class Dedupe:
    """Which texts ``dedupe`` kept, how many it removed, and why."""

    kept: list[int]  # indices into the input, ascending
    exact: int
    near: int
    pairs: list[tuple[int, int]]  # (removed, kept it duplicates): every exact one, the first near ones

    @property
    def share_removed(self) -> float:
        total = len(self.kept) + self.exact + self.near
        return (self.exact + self.near) / total if total else 0.0


def dedupe(texts: list[str], threshold: float = 0.8, num_perm: int = 64, seed: int = 0) -> Dedupe:
    """Keep the first of every group of exact, then of near duplicates (see the module docstring)."""
    first, exact_pairs = _exact_groups(texts)
    distinct = list(first.values())
    del first  # phase 2 needs no digests
    index = _NearIndex(threshold, num_perm, seed)
    near_of: dict[int, int] = {}
    for i, signature, keys in index.sketches(texts, distinct):
        match = index.match(signature, keys)
        if match is None:
            index.add(i, signature, keys)
        else:
            near_of[i] = match
    exact = [(removed, near_of.get(kept, kept)) for removed, kept in exact_pairs]
    return Dedupe(
        kept=[i for i in distinct if i not in near_of],
        exact=len(exact_pairs),
        near=len(near_of),
        pairs=sorted(exact + list(itertools.islice(near_of.items(), MAX_NEAR_PAIRS))),
    )


def near_duplicate_of(
    texts_a: list[str], texts_b: list[str], threshold: float = 0.8, num_perm: int = 64, seed: int = 0
) -> set[int]:
    """Indices of ``texts_b`` that are exact or near duplicates of some text of ``texts_a``.

    Texts of ``texts_b`` are not compared with each other. Used to check that a held-out set
    shares no query with a training set: ``near_duplicate_of(train, heldout)`` should be empty.
    """
    first_a, _ = _exact_groups(texts_a)
    index = _NearIndex(threshold, num_perm, seed)
    for i, signature, keys in index.sketches(texts_a, list(first_a.values())):
        index.add(i, signature, keys)
    exact = {i for i, text in enumerate(texts_b) if _digest(text) in first_a}
    rest = [i for i in range(len(texts_b)) if i not in exact]
    near = {
        i for i, signature, keys in index.sketches(texts_b, rest) if index.match(signature, keys) is not None
    }
    return exact | near


def signature_matrix(shingle_sets: list[set[bytes]], permutations: np.ndarray) -> np.ndarray:
    """MinHash signatures of many sets in one numpy pass. Row k equals the hash values of
    ``MinHash(permutations=permutations, hashfunc=zlib.crc32, scheme="affine32")`` updated with
    set k: crc32, the fmix32 premix, then a*h+b mod 2^32 per slot, minimum per slot."""
    a, b = permutations
    sizes = np.fromiter(map(len, shingle_sets), dtype=np.int64, count=len(shingle_sets))
    hashes = np.fromiter(
        map(zlib.crc32, itertools.chain.from_iterable(shingle_sets)), dtype=np.uint32, count=int(sizes.sum())
    )
    permuted = _fmix32(hashes)[:, None] * a + b
    signatures = np.full((len(shingle_sets), len(a)), _NO_SHINGLE, dtype=np.uint32)
    filled = sizes > 0  # only the empty text has no shingle: its row stays the empty MinHash's
    if filled.any():
        starts = np.cumsum(sizes) - sizes
        signatures[filled] = np.minimum.reduceat(permuted, starts[filled], axis=0)
    return signatures


def _fmix32(h: np.ndarray) -> np.ndarray:
    """The MurmurHash3 32-bit finalizer: datasketch's premix of input hashes in the affine schemes."""
    h = h ^ (h >> np.uint32(16))
    h = h * np.uint32(0x85EBCA6B)
    h = h ^ (h >> np.uint32(13))
    h = h * np.uint32(0xC2B2AE35)
    return h ^ (h >> np.uint32(16))


def _digest(text: str) -> bytes:
    return hashlib.blake2b(normalize(text).encode(), digest_size=16).digest()


def _exact_groups(texts: list[str]) -> tuple[dict[bytes, int], list[tuple[int, int]]]:
    """Digest of every normalized group -> index of its first text (in input order), and the
    (duplicate, first) pairs."""
    first: dict[bytes, int] = {}
    pairs: list[tuple[int, int]] = []
    for i, text in enumerate(texts):
        j = first.setdefault(_digest(text), i)
        if j != i:
            pairs.append((i, j))
    return first, pairs


class _NearIndex:
    """The kept texts' signatures, and per LSH band a dict: band key -> row, or a list of rows."""

    def __init__(self, threshold: float, num_perm: int, seed: int):
        self.threshold = threshold
        lsh = MinHashLSH(threshold=threshold, num_perm=num_perm, weights=LSH_WEIGHTS)
        self.bands, self.band_size = lsh.b, lsh.r
        self.permutations = MinHash(num_perm=num_perm, seed=seed, scheme=SCHEME).permutations
        # band key: sum of slot * odd multiplier mod 2^64; a rare collision only adds a candidate
        rng = np.random.default_rng(seed)
        self.multipliers = rng.integers(0, 2**63, size=self.band_size, dtype=np.uint64) * 2 + 1
        self.buckets: list[dict[int, int | list[int]]] = [{} for _ in range(self.bands)]
        self.signatures = np.empty((1024, num_perm), dtype=np.uint32)
        self.ids: list[int] = []  # row of self.signatures -> index of the text

    def sketches(self, texts: list[str], indices: list[int]) -> Iterator[tuple[int, np.ndarray, list[int]]]:
        """(index, signature, band keys) of ``texts[i]`` for i in ``indices``, BATCH at a time."""
        for start in range(0, len(indices), BATCH):
            batch = indices[start : start + BATCH]
            signatures = signature_matrix([shingles(texts[i]) for i in batch], self.permutations)
            bands = signatures[:, : self.bands * self.band_size].reshape(len(batch), self.bands, -1)
            keys = (bands.astype(np.uint64) * self.multipliers).sum(axis=2, dtype=np.uint64)
            yield from zip(batch, signatures, keys.tolist(), strict=True)

    def match(self, signature: np.ndarray, keys: list[int]) -> int | None:
        """The kept text most similar to ``signature`` at or above the threshold, or None."""
        rows = sorted(self._candidates(keys))
        if not rows:
            return None
        similarity = (self.signatures[rows] == signature).mean(axis=1)
        best = int(similarity.argmax())
        return self.ids[rows[best]] if similarity[best] >= self.threshold else None

    def _candidates(self, keys: list[int]) -> set[int]:
        rows: set[int] = set()
        for bucket, key in zip(self.buckets, keys, strict=True):
            held = bucket.get(key)
            if isinstance(held, int):
                rows.add(held)
            elif held is not None:
                rows.update(held)
        return rows

    def add(self, i: int, signature: np.ndarray, keys: list[int]) -> None:
        row = len(self.ids)
        if row == len(self.signatures):
            self.signatures = np.concatenate([self.signatures, np.empty_like(self.signatures)])
        self.signatures[row] = signature
        self.ids.append(i)
        for bucket, key in zip(self.buckets, keys, strict=True):
            held = bucket.setdefault(key, row)
            if held != row:
                bucket[key] = [*held, row] if isinstance(held, list) else [held, row]
