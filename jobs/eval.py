"""Entrypoint for ``ray job submit``: evaluate a model directory or an OpenAI-compatible endpoint.

    ray job submit --address http://HEAD:8265 --working-dir . \
        -- python jobs/eval.py --config my.yaml model=s3://bucket/run1/export sets=[s3://bucket/neg/agent_h]

Same arguments as ``agentflan-ray eval``.
"""

import sys

from agentflan_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["eval", *sys.argv[1:]]))
