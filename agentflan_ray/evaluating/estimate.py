"""`eval --estimate`: what a run would ask of the endpoint or the model, from the sets alone.

    agentflan-ray eval --config my.yaml --estimate

Reads the sets (bad rows counted as the job would quarantine them); runs nothing, starts no Ray,
calls no API. Endpoint: one request per case (plus the preflight's one probe of ``tools=`` when
``native_tools: auto``), prompt tokens counted as the other jobs count them (the JSON of the messages,
and of the tools where they go natively, characters / 4), completion tokens assumed
``REPLY_TOKENS`` per case (a call or a short answer; at most ``llm.max_tokens``) with the
``llm.max_tokens`` bound beside it, cost at ``llm.prices``, time at ``llm.rpm`` / ``llm.tpm``; as if
nothing were cached (a rerun pays only for cases not answered before). Model backend: cases, batches
and the generated tokens' upper bound (``max_new_tokens`` per case).
"""

from __future__ import annotations

import json
import math

from agentflan_ray.evaluating.sets import read_sets
from agentflan_ray.jobs.estimate import estimate_tokens, minutes
from agentflan_ray.llm.client import resolve_endpoint
from agentflan_ray.llm.settings import cost, price_per_1k
from agentflan_ray.storage import expand

REPLY_TOKENS = 100  # assumed completion tokens of one reply


def estimate_run(config, log=print) -> dict:
    missing = [spec for spec in config.sets if not expand(spec, config.storage)]
    if missing:
        raise FileNotFoundError("sets: " + "; ".join(f"{spec} matched no file" for spec in missing))
    cases, bad, files = read_sets(config.sets, config.storage)
    counted = {"cases": len(cases), "quarantined": len(bad), "files": len(files)}
    if config.model:
        result = {"backend": "model", **counted, "batches": math.ceil(len(cases) / config.batch_size),
                  "generated_tokens_at_most": len(cases) * config.max_new_tokens}
        log(f"[eval --estimate] {len(cases):,} cases ({len(bad):,} rows would be quarantined) from {len(files)} "
            f"files through {config.model}: {result['batches']:,} batches of {config.batch_size}, at most "
            f"{result['generated_tokens_at_most']:,} generated tokens ({config.max_new_tokens} per case); nothing run")
        return result
    native = config.native_tools != "off"
    prompt_tokens = sum(prompt_tokens_of(case, native) for case in cases)
    per_reply = min(REPLY_TOKENS, config.llm.max_tokens)
    usage = {"prompt_tokens": prompt_tokens, "completion_tokens": len(cases) * per_reply}
    bound = {"prompt_tokens": prompt_tokens, "completion_tokens": len(cases) * config.llm.max_tokens}
    _, model = resolve_endpoint(config.llm)
    price = price_per_1k(config.llm.prices, model)
    requests = len(cases) + (config.native_tools == "auto")
    result = {"backend": "endpoint", **counted, "model": model, "requests": requests, **usage,
              "completion_tokens_assumed_per_case": per_reply, "cost_usd": round(cost(usage, price), 4),
              "completion_tokens_at_most": bound["completion_tokens"], "cost_usd_at_most": round(cost(bound, price), 4),
              "price_per_1k": price, "minutes": minutes(requests, usage, config.llm.rpm, config.llm.tpm)}
    log(f"[eval --estimate] {len(cases):,} cases ({len(bad):,} rows would be quarantined) from {len(files)} files "
        f"-> {requests:,} requests to {model}; no API call made")
    log(f"  tokens: {prompt_tokens:,} prompt (about {prompt_tokens // max(len(cases), 1):,} per case"
        f"{', tools of general cases included' if native else ''}) + {usage['completion_tokens']:,} completion "
        f"(assumed {per_reply} per case; at most {bound['completion_tokens']:,} at llm.max_tokens)")
    log(f"  cost: ${result['cost_usd']:,.4f} (at most ${result['cost_usd_at_most']:,.4f}) at "
        f"${price['input']}/${price['output']} per 1k tokens; nothing cached counted")
    if result["minutes"]:
        log("  time: " + ", ".join(f"at least {m:,} min {k.replace('at_', 'at the ')} limit"
                                   for k, m in result["minutes"].items()))
    else:
        log("  time: set llm.rpm / llm.tpm to your limits for a time estimate")
    return result


def prompt_tokens_of(case: dict, native: bool) -> int:
    """A case's prompt as the simulator and the other estimates count it; its tools where they go natively."""
    text = json.dumps(case["messages"], sort_keys=True, ensure_ascii=False)
    if native and case["protocol"] == "general" and case["tools"]:
        text += json.dumps(case["tools"], sort_keys=True, ensure_ascii=False)
    return estimate_tokens(text)
