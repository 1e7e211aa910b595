"""One module per job, each with the same shape: ``Config`` (its typed config, a ``JobConfig``),
``preflight(config)`` (driver-side checks before Ray starts), ``run(config, log, prepared)`` and
``succeeded(result)``. ``agentflan_ray.cli.JOBS`` lists them; ``jobs/*.py`` at the repository root
are the thin ``ray job submit`` entrypoints."""
