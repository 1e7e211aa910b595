"""The ``agentflan-ray`` command.

    agentflan-ray generate --config jobs/configs/demo.yaml [key=value ...]
    agentflan-ray chat --config jobs/configs/chat_demo.yaml [key=value ...]
    agentflan-ray train --config jobs/configs/train_demo.yaml data=./out/demo model=./tiny max_steps=20
    agentflan-ray pipeline --config jobs/configs/pipeline_demo.yaml
    agentflan-ray serve-sim --port 8000 --latency 0.5 --rpm 6000 [--error-500 0.05 ...]
    agentflan-ray make-tiny-model --data ./out/demo --output ./tiny
    agentflan-ray eval-sets --generate-manifest ./out/run1 --output sets.jsonl [--limit N]

Every job is one module with the same shape, listed in ``JOBS``:

    Config                  its typed config (a ``JobConfig``)
    preflight(config)       checks on the driver before Ray starts (inputs listed, manifests and the
                            API endpoint checked); what it returns is handed to run
    run(config, log, prepared)  the job on the connected Ray cluster; returns its manifest or summary
    succeeded(result)       whether the exit status is 0 (every row accounted for)
    estimate(config, log)   optional, `--estimate`: what the job would ask of the LLM API; runs nothing
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import sys

from agentflan_ray.config import ConfigError, build, load_data

JOBS = {
    "generate": ("agentflan_ray.jobs.generate", "turn agent trajectories into Agent-FLAN sample shards"),
    "chat": ("agentflan_ray.jobs.chat", "answer a file of chat requests through the rate-limited, cached client"),
    "negatives": ("agentflan_ray.jobs.negatives", "Agent-H-style negative samples and the held-out Agent-H set"),
    "train": ("agentflan_ray.jobs.train", "DeepSpeed SFT over generated shards with Ray Train"),
    "eval": ("agentflan_ray.jobs.eval", "tool-call hallucination (Agent-H) and tool-use accuracy of a model or endpoint"),
    "pipeline": ("agentflan_ray.jobs.pipeline", "generate, negatives, train and eval in order; finished stages skipped"),
}


def connect_ray(address: str = "") -> None:
    """Join the cluster named by ``address`` or ``RAY_ADDRESS`` (as under ``ray job submit``), or start
    a local one."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    ray.init(address=address or None, logging_level="WARNING", configure_logging=True)
    ray.data.DataContext.get_current().enable_progress_bars = sys.stderr.isatty()


def prefer_loopback(address: str) -> None:
    """A local single-node cluster binds to 127.0.0.1, not the machine's network address. Ray reads
    this setting when it is imported, so call before the first ``import ray``."""
    if not address and not os.environ.get("RAY_ADDRESS") and "ray" not in sys.modules:
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


def run_job(name: str, config_path: str | None, overrides: list[str], log=print, estimate: bool = False):
    """Load and check the config, run the job's preflight, then connect to Ray and run it; with
    ``estimate``, only the job's cost estimate (no Ray, no API call)."""
    data = load_data(config_path, overrides)
    prefer_loopback(str(data.get("ray_address") or ""))
    job = importlib.import_module(JOBS[name][0])
    config = build(job.Config, data, "")
    if estimate:
        if not hasattr(job, "estimate"):
            raise ConfigError(f"--estimate: the {name} job has no estimate")
        return job, job.estimate(config, log=log)
    prepared = job.preflight(config)  # before Ray: a missing input or a bad key fails in seconds
    connect_ray(config.ray_address)
    return job, job.run(config, log=log, prepared=prepared)


def serve_sim(argv: list[str]) -> int:
    import asyncio
    import dataclasses

    from agentflan_ray.llm.simulator import SimulatorConfig, serve

    parser = argparse.ArgumentParser(prog="agentflan-ray serve-sim", description="OpenAI-compatible API simulator")
    flags = {"latency_s": "--latency", "latency_jitter": "--jitter"}
    for f in dataclasses.fields(SimulatorConfig):
        flag = flags.get(f.name, "--" + f.name.replace("_", "-"))
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if isinstance(default, list):
            parser.add_argument(flag, dest=f.name, nargs="+", default=default)
        elif isinstance(default, bool):
            parser.add_argument(flag, dest=f.name, action="store_true")
        else:
            parser.add_argument(flag, dest=f.name, type=type(default), default=default)
    config = SimulatorConfig(**vars(parser.parse_args(argv)))
    print(f"LLM simulator on http://{config.host}:{config.port}/v1 (models: {', '.join(config.models)}); "
          f"stats at http://{config.host}:{config.port}/stats", flush=True)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(config))
    return 0


def eval_sets(args) -> int:
    from agentflan_ray.evaluating.build import SUITES, build_sets, generate_holdout, write_jsonl
    from agentflan_ray.storage import StorageConfig

    storage = StorageConfig()
    seed, share, toolbench = args.seed, args.holdout_share, args.toolbench
    if args.generate_manifest:  # the generate run's own seed and share: the suites are what it held out
        held = generate_holdout(args.generate_manifest, storage)
        for flag, given, used in (("--seed", seed, held["seed"]), ("--holdout-share", share, held["share"])):
            if given is not None and given != used:
                raise ConfigError(f"{flag} {given} differs from the {used} of the generate run {args.generate_manifest}")
        seed, share, toolbench = held["seed"], held["share"], toolbench or held["toolbench_inputs"]
    seed, share = 0 if seed is None else seed, 0.05 if share is None else share
    if not toolbench:
        raise ConfigError("eval-sets: give --toolbench or --generate-manifest")
    if not 0.0 <= share <= 1.0 or args.limit < 0:
        raise ConfigError("--holdout-share must be within [0, 1] and --limit 0 or more")
    cases, counts = build_sets(toolbench, tuple(args.suite or SUITES), seed, share, args.limit, storage)
    write_jsonl(cases, args.output, storage)
    print(f"{len(cases):,} cases {counts['cases']} from {counts['held_out']:,} held-out (seed {seed}, share {share}) of "
          f"{counts['trajectories']:,} usable trajectories -> {args.output}; left out: "
          f"{counts['records_left_out'] | counts['cases_left_out'] or 'none'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["serve-sim"]:
        return serve_sim(argv[1:])
    parser = argparse.ArgumentParser(prog="agentflan-ray", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    for name, (_, help_text) in JOBS.items():
        command = commands.add_parser(name, help=help_text)
        command.add_argument("--config", help="YAML config file (see jobs/configs/)")
        command.add_argument("overrides", nargs="*", help="key=value overrides, dotted keys allowed (llm.rpm=600)")
        command.add_argument("--estimate", action="store_true",
                             help="print what the job would ask of the LLM API (requests, tokens, cost, time); run nothing")
    commands.add_parser("serve-sim", help="start the OpenAI-compatible API simulator (see serve-sim --help)")
    tiny = commands.add_parser("make-tiny-model", help="a tiny Llama-style model + tokenizer trained on generated data")
    tiny.add_argument("--data", required=True, help="a generate output directory")
    tiny.add_argument("--output", required=True)
    sets = commands.add_parser("eval-sets", help="the eval job's tool_call and instruct suites from held-out "
                                                 "ToolBench trajectories, as JSONL (see evaluating/build.py)")
    sets.add_argument("--generate-manifest", metavar="OUTPUT",
                      help="a generate output with eval_holdout set: seed, share and ToolBench paths from its manifest")
    sets.add_argument("--toolbench", action="append",
                      help="ToolBench answer files: a path, folder or glob, local or s3:// (repeatable; as in the "
                           "generate config, so trajectory ids match; default: the --generate-manifest run's)")
    sets.add_argument("--output", required=True, help="the JSONL file to write")
    sets.add_argument("--suite", action="append", choices=("tool_call", "instruct"), help="a suite to build (repeatable; default both)")
    sets.add_argument("--limit", type=int, default=0, help="at most this many cases per suite (0: all)")
    sets.add_argument("--seed", type=int, help="the generate job's seed: held-out choice and renderings (default 0)")
    sets.add_argument("--holdout-share", type=float,
                      help="share of trajectories held out, by a seeded hash of their id: the generate job's "
                           "eval_holdout (default 0.05)")
    # A flag may come after key=value overrides (argparse stops at the first positional list).
    estimate = "--estimate" in argv
    args = parser.parse_args([a for a in argv if a != "--estimate"])
    args.estimate = estimate
    try:
        if args.command == "eval-sets":
            return eval_sets(args)
        if args.command == "make-tiny-model":
            from agentflan_ray.training.tiny_model import make_tiny_model

            print(f"tiny model written to {make_tiny_model(args.data, args.output)}")
            return 0
        job, result = run_job(args.command, args.config, args.overrides, estimate=args.estimate)
        return 0 if args.estimate or job.succeeded(result) else 1
    except ConfigError as exc:
        print(f"agentflan-ray: config error: {exc}", file=sys.stderr)
        return 2
    except FileNotFoundError as exc:
        print(f"agentflan-ray: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        from agentflan_ray.llm.client import FatalLLMError, ray_remote_error_cause

        cause = ray_remote_error_cause(exc)
        if isinstance(cause, FatalLLMError):
            print(f"agentflan-ray: {cause}", file=sys.stderr)
            return 2
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
