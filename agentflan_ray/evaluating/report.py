"""Scores and the report: per suite and protocol, hallucination and tool-use accuracy.

    hallucination   a call where ``no_call`` was expected (share of those cases, in %)
    H_ReAct / H_General   the hallucination rate of suite agent_h under each protocol
    H_Score         ((100 - H_ReAct) + (100 - H_General)) / 2, higher is better (Agent-FLAN, Table 4)
    positives       cases expecting a call: called at all, right name, right arguments (as values)
    format hit      instruct cases: the reply called in the protocol the case asks for (T-Eval's
                    instruct score: format hit, then name, then arguments, which count only then)
"""

from __future__ import annotations

from collections import defaultdict

REFERENCE = [  # Agent-FLAN paper, Llama-2-7B, Agent-H
    ("Llama-2-7B-chat", 78.7), ("AgentTuning", 83.9), ("Agent-FLAN without negatives", 84.5),
    ("Agent-FLAN", 89.1), ("GPT-4", 94.2),
]


def pct(part: int, whole: int) -> float | None:
    return round(100 * part / whole, 2) if whole else None


def score(results: list[dict]) -> dict:
    """``results``: per-case rows with suite, protocol, expect_call (bool), called, name_right,
    arguments_right, correct, format_hit (None where no format is asked). Returns the report's ``scores``."""
    groups = defaultdict(list)
    for row in results:
        groups[(row["suite"], row["protocol"])].append(row)
    per_group = {}
    for (suite, protocol), rows in sorted(groups.items()):
        negatives = [r for r in rows if not r["expect_call"]]
        positives = [r for r in rows if r["expect_call"]]
        formatted = [r for r in rows if r.get("format_hit") is not None]
        per_group[f"{suite}/{protocol}"] = {
            "cases": len(rows), "correct": pct(sum(r["correct"] for r in rows), len(rows)),
            "negatives": len(negatives), "hallucination": pct(sum(r["called"] for r in negatives), len(negatives)),
            "positives": len(positives), "call_rate": pct(sum(r["called"] for r in positives), len(positives)),
            "name_accuracy": pct(sum(r["name_right"] for r in positives), len(positives)),
            "argument_accuracy": pct(sum(r["arguments_right"] for r in positives), len(positives)),
            "format_hit": pct(sum(r["format_hit"] for r in formatted), len(formatted)),
        }
    scores = {"groups": per_group}
    react, general = (per_group.get(f"agent_h/{p}", {}).get("hallucination") for p in ("react", "general"))
    if react is not None and general is not None:
        scores["agent_h"] = {"H_ReAct": react, "H_General": general,
                             "H_Score": round(((100 - react) + (100 - general)) / 2, 2)}
    return scores


def markdown(report: dict, compare: dict | None = None) -> str:
    lines = [f"# Evaluation of {report['model']['name']}", "",
             f"Backend `{report['model']['backend']}`; generation {report['generation']}; sets "
             + ", ".join(f"`{s['path']}` ({s['sha256'][:12]})" for s in report["sets"]), "",
             "| suite/protocol | cases | correct % | hallucination % | call rate % | format hit % | name % | arguments % |",
             "|---|---|---|---|---|---|---|---|"]
    for group, s in report["scores"]["groups"].items():
        cells = [s.get(k) for k in ("correct", "hallucination", "call_rate", "format_hit", "name_accuracy",
                                    "argument_accuracy")]
        lines.append(f"| {group} | {s['cases']} | " + " | ".join("" if c is None else f"{c:.1f}" for c in cells) + " |")
    agent_h = report["scores"].get("agent_h")
    if agent_h:
        lines += ["", "## Agent-H", "", "| model | H_ReAct | H_General | H_Score |", "|---|---|---|---|",
                  f"| **this run** | {agent_h['H_ReAct']:.1f} | {agent_h['H_General']:.1f} | **{agent_h['H_Score']:.1f}** |"]
        if compare and compare.get("scores", {}).get("agent_h"):
            other = compare["scores"]["agent_h"]
            lines.append(f"| compared run ({compare['model']['name']}) | {other['H_ReAct']:.1f} | "
                         f"{other['H_General']:.1f} | {other['H_Score']:.1f} (Δ {agent_h['H_Score'] - other['H_Score']:+.1f}) |")
        lines += [f"| {name} (paper) | | | {value} |" for name, value in REFERENCE]
        lines += ["", "The paper's rows are Llama-2-7B models on the unreleased Agent-H set; compare them with "
                  "care, and two runs only on the same set hashes and generation settings."]
    return "\n".join(lines) + "\n"


def deltas(scores: dict, other: dict) -> dict:
    """Per group and metric, this run minus ``other`` (where both have the figure)."""
    result = {}
    for group, metrics in scores["groups"].items():
        before = other.get("groups", {}).get(group, {})
        result[group] = {k: round(v - before[k], 2) for k, v in metrics.items()
                         if isinstance(v, int | float) and isinstance(before.get(k), int | float)}
    return result
