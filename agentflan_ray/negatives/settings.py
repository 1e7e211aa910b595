"""Settings of negative synthesis shared by the `negatives` job and `generate`'s negative stream."""

from __future__ import annotations

from dataclasses import dataclass, field

from agentflan_ray.config import ConfigError


@dataclass
class ScenarioShares:
    no_tools: float = 0.5
    irrelevant_tools: float = 0.5

    def validate(self, key: str) -> None:
        shares = [self.no_tools, self.irrelevant_tools]
        if any(not 0 <= s <= 1 for s in shares) or abs(sum(shares) - 1) > 1e-6:
            raise ConfigError(f"{key}: shares must be within [0, 1] and add up to 1, got {shares}")


@dataclass
class NegativeStream:
    """`generate`'s `negative` stream: ``count`` validated negatives built from the job's own inputs
    (0: none). The held-out Agent-H set is the `negatives` job's."""

    count: int = 0
    tool_catalogs: list[str] = field(default_factory=list)  # T-Eval-style api_descrip.json files
    scenarios: ScenarioShares = field(default_factory=ScenarioShares)
    llm_queries: float = 0.25
    dedupe_threshold: float = 0.8

    def validate(self, key: str) -> None:
        if self.count < 0:
            raise ConfigError(f"{key}.count: must be 0 or more, got {self.count}")
        for name in ("llm_queries", "dedupe_threshold"):
            if not 0 <= getattr(self, name) <= 1:
                raise ConfigError(f"{key}.{name}: must be within [0, 1], got {getattr(self, name)}")
