"""From one parsed trajectory to its samples: the stream split and the per-source renderers."""

from __future__ import annotations

from typing import TYPE_CHECKING

from agentflan_ray.aligning.agentinstruct import render_agentinstruct
from agentflan_ray.aligning.split import held_out, pick_share, unit_hash
from agentflan_ray.aligning.toolbench import (
    render_instruct,
    render_react,
    render_tflan_cot,
    render_tflan_decomposed,
)
from agentflan_ray.records import Conversation, EnvTrajectory, Sample, ToolTrajectory

if TYPE_CHECKING:
    from agentflan_ray.jobs.generate import GenerateConfig

TOOLBENCH_RENDERERS = {
    "react": render_react,
    "tflan_cot": render_tflan_cot,
    "tflan_decomposed": render_tflan_decomposed,
}


def toolbench_stream(trajectory_id: str, config: GenerateConfig) -> str:
    shares = {
        "react": config.toolbench_split.react,
        "tflan_cot": config.toolbench_split.tflan_cot,
        "tflan_decomposed": config.toolbench_split.tflan_decomposed,
    }
    return pick_share(unit_hash(config.seed, trajectory_id, "stream"), shares)


def held_out_for_eval(trajectory, config: GenerateConfig) -> bool:
    """A ToolBench trajectory kept out of training for the `tool_call` / `instruct` eval suites
    (`eval_holdout`); `evaluating/build.py` builds them from exactly these."""
    return isinstance(trajectory, ToolTrajectory) and held_out(config.seed, trajectory.id, config.eval_holdout)


def align(trajectory, config: GenerateConfig) -> list[Sample]:
    if isinstance(trajectory, ToolTrajectory):
        stream = toolbench_stream(trajectory.id, config)
        samples = [TOOLBENCH_RENDERERS[stream](trajectory, config.seed)]
        if unit_hash(config.seed, trajectory.id, "instruct") < config.instruct_share:
            instruct = render_instruct(trajectory, config.seed)
            if instruct is not None:
                samples.append(instruct)
        return samples
    if isinstance(trajectory, EnvTrajectory):
        return render_agentinstruct(trajectory, config.seed, config.agentinstruct_streams)
    if isinstance(trajectory, Conversation):
        return [
            Sample(
                id=f"{trajectory.source}/{trajectory.id}/{trajectory.stream}",
                source=trajectory.source,
                source_id=trajectory.id,
                stream=trajectory.stream,
                messages=trajectory.messages,
            )
        ]
    raise TypeError(f"cannot align {type(trajectory).__name__}")
