"""Speed and peak memory of `dedupe` on synthetic user queries with known duplicates.

    python bench/dedupe_queries.py --queries 100000
    python bench/dedupe_queries.py --queries 1000000 --threshold 0.8

The queries (11-57 words, median 26; seeded: the same for every run of one size) are drawn in turn:

    fresh  72%  one of 14 requests, after one of 7 openers and before one of 7 closers (each with
                probability 0.6), slots filled from entity lists (cities, dates, products, languages,
                tracking numbers, ...); the 10 real ToolBench queries of tests/fixtures come first.
                Fresh ones that differ in one slot near an end are near duplicates by word 3-grams
                too, and some collide exactly, as LLM-written queries do.
    exact  15%  an earlier query with its case, spacing and end punctuation changed
    near   13%  an earlier query with one edit: a greeting or "please" added, the last word dropped
                or replaced (these change one 3-gram), or every "can" made "could" (often none)

Prints one JSON line: queries, seconds (dedupe alone), queries_per_s, peak_rss_mb (this process,
sampled every 20 ms in a thread, the queries themselves included: rss_before_mb), exact, near,
share_removed, the mix drawn, and 5 near pairs (removed, kept) for eyeballing.
"""

from __future__ import annotations

import argparse
import json
import random
import threading
import time
from pathlib import Path

import psutil

from agentflan_ray.negatives.dedupe import dedupe, normalize

FIXTURES = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "toolbench" / "answer"
MIX = {"fresh": 0.72, "exact": 0.15, "near": 0.13}

OPENERS = [
    "I'm planning a {event} in {city} in {month}.",
    "My {relative} is visiting from {city2} next week.",
    "I work for {company} and travel to {city} a lot.",
    "We are a group of {people} {occupation}s on a budget.",
    "I just moved to {city} from {city2} and don't know the area yet.",
    "Quick question for my {event} on {date}.",
    "I'm a {occupation} helping a client from {company}.",
]
REQUESTS = [
    "Can you find me the cheapest flights from {city} to {city2} on {date} for {count} adults?",
    "I need a hotel in {city} near the {place} for {count} nights starting {date}, with free breakfast.",
    "What will the weather be like in {city} on {date}, and should I book an indoor venue?",
    "Please track my package with the tracking number {tracking} and tell me when it will arrive.",
    "Translate '{phrase}' into {lang} and give me the pronunciation.",
    "Can you suggest {count} {cuisine} restaurants in {city} that can host {people} people on {date}?",
    "Compare the prices of the {product} on {shop} and {shop2}, and tell me which one ships faster.",
    "Send an email to {name} at {company} saying that the meeting on {date} is moved to {time}.",
    "Find the latest news about {company} in {lang} and summarize the {count} most important articles.",
    "Convert {amount} {currency} to {currency2} at today's exchange rate and show the rate used.",
    "Book a table for {people} at a {cuisine} restaurant in {city} on {date} at {time}.",
    "What are the opening hours of the {place} in {city} on {date}, and how much is a ticket?",
    "I want to buy a {product} under {amount} {currency}; which shops in {city} have it in stock?",
    "Give me the {sport} scores from last night and the schedule of {team}'s next {count} games.",
]
CLOSERS = [
    "My budget is {amount} {currency}.",
    "Please answer in {lang}.",
    "Keep the answer under {count} sentences.",
    "I prefer options close to the {place}.",
    "{name} will pay, so include the invoice details.",
    "It has to be confirmed before {time} on {date}.",
    "Thank you so much for your help!",
]
CITIES = [
    "Paris", "Berlin", "Tokyo", "Lagos", "Lima", "Oslo", "Cairo", "Denver", "Austin", "Madrid", "Rome",
    "Seoul",
    "Hanoi", "Quito", "Dublin", "Prague", "Vienna", "Nairobi", "Sydney", "Toronto", "Boston", "Chicago",
    "Mumbai", "Delhi", "Istanbul", "Athens", "Lisbon", "Warsaw", "Helsinki", "Zurich", "Geneva", "Munich",
    "Milan", "Naples", "Porto", "Seville", "Valencia", "Bogota", "Santiago", "Havana",
]
MONTHS = ["January", "March", "May", "June", "August", "October", "November", "December"]
SHOPS = ["Amazon", "eBay", "Walmart", "BestBuy", "Target", "Costco", "AliExpress", "Zalando"]
CURRENCIES = ["USD", "EUR", "GBP", "JPY", "CHF", "CAD", "AUD", "INR", "BRL", "ZAR"]
ENTITIES = {
    "city": CITIES,
    "month": MONTHS,
    "date": [f"{month} {day}" for month in MONTHS for day in range(1, 29)],
    "count": ["two", "three", "four", "five", "six", "seven"],
    "people": [str(n) for n in range(2, 41)],
    "relative": ["mother", "father", "sister", "brother", "aunt", "uncle", "grandmother", "cousin"],
    "occupation": ["student", "nurse", "teacher", "developer", "photographer", "consultant", "chef"],
    "place": ["museum", "cathedral", "stadium", "airport", "harbour", "zoo", "castle", "aquarium", "station"],
    "event": ["birthday party", "wedding", "company retreat", "charity gala", "family reunion", "hackathon"],
    "lang": ["French", "German", "Spanish", "Japanese", "Korean", "Italian", "Portuguese", "Arabic", "Hindi"],
    "phrase": ["where is the train station", "I would like a coffee", "how much does this cost",
               "my luggage is lost", "can you help me please", "the meeting starts at noon",
               "I am allergic to peanuts", "is this seat taken", "where can I buy a ticket"],
    "cuisine": ["Italian", "Thai", "Mexican", "Ethiopian", "Korean", "Lebanese", "Peruvian", "vegan"],
    "product": ["iPhone 14", "Pixel 8", "Galaxy S23", "Kindle Paperwhite", "Sony WH-1000XM5",
                "Nintendo Switch", "MacBook Air", "Dyson V15", "Instant Pot", "GoPro Hero 12"],
    "shop": SHOPS,
    "name": ["Alice", "Bob", "Carla", "Diego", "Emma", "Farid", "Grace", "Hiro", "Ines", "Jonas", "Kemi"],
    "company": ["Acme", "Globex", "Initech", "Umbrella", "Hooli", "Stark", "Wayne", "Wonka", "Tyrell"],
    "time": [f"{h}:{m:02d} {p}" for h in range(1, 13) for m in (0, 15, 30, 45) for p in ("am", "pm")],
    "amount": [str(n) for n in (50, 100, 150, 200, 250, 300, 500, 750, 1000, 1500, 2000, 5000)],
    "currency": CURRENCIES,
    "sport": ["football", "basketball", "baseball", "hockey", "cricket", "tennis"],
    "team": ["Arsenal", "the Lakers", "the Yankees", "Real Madrid", "the Celtics", "Bayern", "the Bulls"],
}
GREETINGS = ["Hi,", "Hello!", "Hey there,", "Good morning,"]
ENDINGS = ["please", "thanks", "asap", "today"]


def real_queries() -> list[str]:
    paths = sorted(FIXTURES.glob("*/*.json"))
    return [json.loads(p.read_text())["answer_generation"]["query"] for p in paths]


def fresh_query(rng: random.Random) -> str:
    """A request, after an opener and before a closer each with probability 0.6, slots filled."""
    slots = {key: rng.choice(values) for key, values in ENTITIES.items()}
    for key in ("city", "shop", "currency"):
        slots[f"{key}2"] = rng.choice([v for v in ENTITIES[key] if v != slots[key]])
    slots["tracking"] = f"{rng.choice(SHOPS)[:2].upper()}{rng.randrange(10**9):09d}"
    parts = [rng.choice(OPENERS) if rng.random() < 0.6 else "", rng.choice(REQUESTS),
             rng.choice(CLOSERS) if rng.random() < 0.6 else ""]
    return " ".join(part for part in parts if part).format(**slots)


def exact_copy(rng: random.Random, query: str) -> str:
    changes = [
        str.lower,
        str.upper,
        lambda q: "  " + q.replace(" ", "   ") + " ",
        lambda q: q.rstrip("?.!") + "!!",
    ]
    return rng.choice(changes)(query)


def near_copy(rng: random.Random, query: str) -> str:
    words = query.split()
    edits = [
        lambda: [rng.choice(GREETINGS), *words],
        lambda: [*words, rng.choice(ENDINGS)],
        lambda: words[:-1],
        lambda: [*words[:-1], rng.choice(ENDINGS)],
        lambda: [{"Can": "Could", "can": "could"}.get(word, word) for word in words],
    ]
    return " ".join(rng.choice(edits)())


def make_queries(n: int, seed: int = 0) -> tuple[list[str], dict[str, int]]:
    rng = random.Random(seed)
    queries = real_queries()[:n]
    drawn = {"fresh": len(queries), "exact": 0, "near": 0}
    kinds, weights = list(MIX), list(MIX.values())
    while len(queries) < n:
        kind = rng.choices(kinds, weights)[0]
        if kind == "fresh":
            queries.append(fresh_query(rng))
        else:
            copy = exact_copy if kind == "exact" else near_copy
            queries.append(copy(rng, rng.choice(queries)))
        drawn[kind] += 1
    return queries, drawn


class PeakRss:
    """Peak resident set size of this process, sampled in a thread."""

    def __init__(self, interval_s: float = 0.02):
        self.interval_s = interval_s
        self.peak = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.sample, daemon=True)

    def sample(self) -> None:
        me = psutil.Process()
        while not self.stop.is_set():
            self.peak = max(self.peak, me.memory_info().rss)
            self.stop.wait(self.interval_s)

    def __enter__(self) -> PeakRss:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()


def near_samples(queries: list[str], pairs: list[tuple[int, int]], k: int, seed: int = 0) -> list[dict]:
    near = [(r, kept) for r, kept in pairs if normalize(queries[r]) != normalize(queries[kept])]
    picked = random.Random(seed).sample(near, min(k, len(near)))
    return [{"removed": queries[r], "kept": queries[kept]} for r, kept in sorted(picked)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queries", type=int, default=100_000)
    parser.add_argument("--threshold", type=float, default=0.8)
    args = parser.parse_args()

    queries, drawn = make_queries(args.queries)
    rss_before = psutil.Process().memory_info().rss
    with PeakRss() as rss:
        start = time.perf_counter()
        result = dedupe(queries, threshold=args.threshold)
        seconds = time.perf_counter() - start
    print(json.dumps({
        "queries": len(queries),
        "threshold": args.threshold,
        "seconds": round(seconds, 2),
        "queries_per_s": round(len(queries) / seconds),
        "peak_rss_mb": round(rss.peak / 2**20),
        "rss_before_mb": round(rss_before / 2**20),
        "exact": result.exact,
        "near": result.near,
        "share_removed": round(result.share_removed, 4),
        "drawn": drawn,
        "near_samples": near_samples(queries, result.pairs, 5),
    }))


if __name__ == "__main__":
    main()
