"""Entrypoint for ``ray job submit``: run the `generate` job on the cluster it is submitted to.

    ray job submit --address http://HEAD:8265 --working-dir . \
        --runtime-env-json '{"env_vars": {"AWS_ENDPOINT_URL": "http://minio:9000"}}' \
        -- python jobs/generate.py --config jobs/configs/demo.yaml output=s3://bucket/run1 seed=3

Credentials reach the workers through the cluster's environment or ``--runtime-env-json``; never put
them in the config. Same arguments as ``agentflan-ray generate``.
"""

import sys

from agentflan_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["generate", *sys.argv[1:]]))
