"""Settings of an OpenAI-compatible endpoint and of how hard to drive it, shared by every LLM job."""

from __future__ import annotations

from dataclasses import dataclass, field

from agentflan_ray.config import ConfigError, require_at_least

DEFAULT_PRICES = {
    # USD per 1,000 tokens, matched by the longest model-name prefix; override in config.
    "gpt-4o-mini": {"input": 0.00015, "output": 0.0006},
    "gpt-4o": {"input": 0.0025, "output": 0.01},
    "gpt-4-turbo": {"input": 0.01, "output": 0.03},
    "gpt-4": {"input": 0.03, "output": 0.06},
    "gpt-3.5-turbo": {"input": 0.0005, "output": 0.0015},
    "sim-": {"input": 0.03, "output": 0.06},
}


@dataclass
class LLMConfig:
    """An OpenAI-compatible chat endpoint and how hard to drive it. The key itself never lives here:
    only the name of the environment variable that holds it."""

    base_url: str = ""  # empty: $OPENAI_BASE_URL, else the OpenAI API
    api_key_env: str = "OPENAI_API_KEY"
    model: str = ""  # empty: $OPENAI_MODEL, else gpt-4
    temperature: float = 0.7
    max_tokens: int = 1024
    timeout_s: float = 60.0
    max_attempts: int = 8
    backoff_initial_s: float = 0.5
    backoff_max_s: float = 30.0
    # Shared cluster-wide budget; 0 means "none unless the API's x-ratelimit-limit-* headers say so".
    rpm: int = 0
    tpm: int = 0
    learn_limits: bool = True
    burst_s: float = 0.5
    concurrency: int = 64  # requests in flight per actor
    actors: int = 2
    batch_size: int = 256
    prompt_version: str = "v1"
    max_reasks: int = 2
    cache: bool = True
    prices: dict = field(default_factory=lambda: dict(DEFAULT_PRICES))

    def validate(self, key: str) -> None:
        require_at_least(self, key, ("max_tokens", "max_attempts", "concurrency", "actors", "batch_size"), 1)
        require_at_least(self, key, ("rpm", "tpm", "max_reasks"), 0)
        if self.timeout_s <= 0:
            raise ConfigError(f"{key}.timeout_s: must be positive, got {self.timeout_s}")
        for model, price in self.prices.items():
            if not isinstance(price, dict) or set(price) != {"input", "output"}:
                raise ConfigError(f"{key}.prices.{model}: expected {{input: USD per 1k tokens, output: ...}}")


def price_per_1k(prices: dict, model: str) -> dict:
    """The price entry of the longest model-name prefix that matches; free when none does."""
    match = max((name for name in prices if model.startswith(name)), key=len, default=None)
    return prices[match] if match else {"input": 0.0, "output": 0.0}


def cost(usage, price: dict) -> float:
    """USD for ``usage`` (a mapping with prompt_tokens and completion_tokens) at ``price``."""
    return (usage["prompt_tokens"] * price["input"] + usage["completion_tokens"] * price["output"]) / 1000
