"""The ``agentflan-ray`` command.

    agentflan-ray generate --config jobs/configs/demo.yaml [key=value ...]
"""

from __future__ import annotations

import argparse
import os
import sys

from agentflan_ray.config import ConfigError, GenerateConfig, load_config


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


def run_generate(config_path: str | None, overrides: list[str]) -> dict:
    config = load_config(GenerateConfig, config_path, overrides)
    prefer_loopback(config.ray_address)
    from agentflan_ray.generate import generate

    connect_ray(config.ray_address)
    return generate(config)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="agentflan-ray", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    gen = commands.add_parser("generate", help="turn agent trajectories into Agent-FLAN sample shards")
    gen.add_argument("--config", help="YAML config file (see jobs/configs/)")
    gen.add_argument("overrides", nargs="*", help="key=value overrides, dotted keys allowed (balance.preset=paper)")
    args = parser.parse_args(argv)
    try:
        if args.command == "generate":
            manifest = run_generate(args.config, args.overrides)
            return 0 if manifest["counts"]["read"] == manifest["counts"]["written"] + manifest["counts"]["quarantined"] else 1
    except ConfigError as exc:
        print(f"agentflan-ray: config error: {exc}", file=sys.stderr)
        return 2
    except FileNotFoundError as exc:
        print(f"agentflan-ray: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
