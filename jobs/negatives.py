"""Entrypoint for ``ray job submit``: Agent-H-style negatives and the held-out Agent-H set.

    ray job submit --address http://HEAD:8265 --working-dir . \
        -- python jobs/negatives.py --config my.yaml count=200000 output=s3://bucket/neg llm.rpm=5000

The key is read on the driver from the variable ``llm.api_key_env`` names (OPENAI_API_KEY by
default). Same arguments as ``agentflan-ray negatives``.
"""

import sys

from agentflan_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["negatives", *sys.argv[1:]]))
