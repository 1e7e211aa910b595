"""Exact and near-duplicate removal of queries (agentflan_ray.negatives.dedupe)."""

from __future__ import annotations

import random
import zlib

import pytest
from datasketch import MinHash

from agentflan_ray.negatives import dedupe as dd
from agentflan_ray.negatives.dedupe import (
    Dedupe,
    dedupe,
    near_duplicate_of,
    normalize,
    shingles,
    signature_matrix,
)

# 20 words, 18 word 3-grams
BASE = "Can you find me the cheapest flights from Paris to Berlin on March 3 for two adults with one bag"
WORDS = BASE.split()
LAST_WORD_CHANGED = " ".join([*WORDS[:-1], "please"])  # 1 of 18 shingles changes: J = 17/19
MID_WORD_CHANGED = " ".join([*WORDS[:10], "Munich", *WORDS[11:]])  # Berlin -> Munich: 3 change, J = 15/21
OTHER = "What will the weather be like in Oslo next weekend, and should I pack an umbrella for the hike?"


def jaccard(a: str, b: str) -> float:
    sa, sb = shingles(a), shingles(b)
    return len(sa & sb) / len(sa | sb)


def random_queries(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(f"w{rng.randrange(5000)}" for _ in range(rng.randint(10, 30))) for _ in range(n)]


def test_normalize_folds_case_width_spacing_and_edge_punctuation():
    assert normalize("  Book a   FLIGHT\tto Paris!! ") == "book a flight to paris"
    assert normalize("«¿Qué tal?» ﬁle Straße Ｐａｒｉｓ") == "qué tal file strasse paris"
    assert normalize("Don't stop: 3.5% of e-mail (x.y.z) - ok") == "don't stop 3.5 of e-mail x.y.z ok"
    for text in ["«¿Qué tal?» ﬁle", "  A  -- b ", "ℌello"]:
        assert normalize(normalize(text)) == normalize(text)


def test_shingles_are_word_3grams_of_the_normalized_text():
    assert shingles("Book a FLIGHT, to Paris!") == {b"book a flight", b"a flight to", b"flight to paris"}
    assert shingles("Hello there") == {b"hello", b"there"}
    assert shingles("Café") == {"café".encode()}
    assert shingles("  ?! ") == set()
    assert len(shingles(BASE)) == 18


def test_signatures_equal_datasketch_minhash():
    sets = [shingles(t) for t in [BASE, OTHER, "hi", "", *random_queries(20)]]
    permutations = MinHash(num_perm=64, seed=3, scheme="affine32").permutations
    ours = signature_matrix(sets, permutations)
    theirs = MinHash.bulk([list(s) for s in sets], num_perm=64, seed=3, hashfunc=zlib.crc32)
    assert ours.shape == (len(sets), 64)
    for row, minhash in zip(ours, theirs, strict=True):
        assert row.tolist() == minhash.hashvalues.tolist()


def test_exact_duplicates_differing_in_case_spacing_and_punctuation_are_removed():
    texts = ["Book a flight to Paris.", OTHER, "book a   FLIGHT to paris", " Book a flight to Paris!! "]
    texts.append(OTHER.upper())
    result = dedupe(texts)
    assert result == Dedupe(kept=[0, 1], exact=3, near=0, pairs=[(2, 0), (3, 0), (4, 1)])
    assert result.share_removed == pytest.approx(3 / 5)


def test_one_word_changed_at_the_end_is_a_near_duplicate_at_0_8():
    assert jaccard(BASE, LAST_WORD_CHANGED) == pytest.approx(17 / 19)
    result = dedupe([BASE, OTHER, LAST_WORD_CHANGED])
    assert (result.kept, result.exact, result.near, result.pairs) == ([0, 1], 0, 1, [(2, 0)])


def test_one_word_changed_mid_query_needs_a_lower_threshold():
    # 3 of 18 shingles change: J ~ 0.71, below 0.8; 128 permutations keep the estimate within +-0.04
    assert jaccard(BASE, MID_WORD_CHANGED) == pytest.approx(15 / 21)
    assert dedupe([BASE, MID_WORD_CHANGED], threshold=0.8, num_perm=128).kept == [0, 1]
    assert dedupe([BASE, MID_WORD_CHANGED], threshold=0.6, num_perm=128).kept == [0]


def test_unrelated_queries_are_all_kept():
    texts = [BASE, OTHER, *random_queries(200)]
    result = dedupe(texts, threshold=0.5)
    assert (result.kept, result.exact, result.near, result.pairs) == (list(range(202)), 0, 0, [])


def test_the_first_occurrence_is_kept_and_results_are_deterministic():
    texts = [OTHER, LAST_WORD_CHANGED, *random_queries(50), BASE, BASE.lower()]
    first = dedupe(texts)
    assert first.kept == list(range(52))
    assert first.pairs == [(52, 1), (53, 1)]  # the exact copy of a near duplicate points at the kept text
    assert (first.exact, first.near) == (1, 1)
    assert dedupe(texts) == first
    reverse = dedupe(list(reversed(texts)))  # BASE.lower() first, then BASE, 50 others, LAST_WORD_CHANGED
    assert reverse.kept == [0, *range(2, 52), 53]
    assert reverse.pairs == [(1, 0), (52, 0)]


def test_batches_and_a_growing_store_give_the_same_result(monkeypatch):
    originals = random_queries(1500, seed=1)  # more kept texts than the store's first 1024 rows
    copies = [q + " please" for q in originals[1100:1200]] + [q.upper() for q in originals[:50]]
    texts = originals + copies
    whole = dedupe(texts)
    assert (len(whole.kept), whole.exact, whole.near) == (1500, 50, 100)
    assert whole.pairs[:1] == [(1500, 1100)]
    monkeypatch.setattr(dd, "BATCH", 7)
    monkeypatch.setattr(dd, "MAX_NEAR_PAIRS", 3)
    batched = dedupe(texts)
    assert batched.kept == whole.kept
    assert (batched.exact, batched.near) == (50, 100)
    assert [p for p in batched.pairs if p[0] < 1600] == [(1500, 1100), (1501, 1101), (1502, 1102)]


def test_empty_and_whitespace_texts_are_duplicates_of_each_other():
    result = dedupe(["", "Book a flight", "   ", "\n\t", "?!", "book a flight"])
    assert result == Dedupe(kept=[0, 1], exact=4, near=0, pairs=[(2, 0), (3, 0), (4, 0), (5, 1)])
    assert dedupe([]) == Dedupe(kept=[], exact=0, near=0, pairs=[])
    assert dedupe([]).share_removed == 0.0
    assert near_duplicate_of([""], [" ", "x"]) == {0}
    assert near_duplicate_of([], ["x", ""]) == set()


def test_near_duplicate_of_finds_heldout_queries_that_leak_from_training():
    train = [BASE, *random_queries(100)]
    heldout = [OTHER, BASE.upper(), LAST_WORD_CHANGED, MID_WORD_CHANGED, OTHER, random_queries(101)[100]]
    assert near_duplicate_of(train, heldout, num_perm=128) == {1, 2}
    assert near_duplicate_of(train, heldout, threshold=0.6, num_perm=128) == {1, 2, 3}
    assert near_duplicate_of(heldout, train) == {0}
