"""Entrypoint for ``ray job submit``: generate, negatives, train and eval as one submission.

    ray job submit --address http://HEAD:8265 --working-dir . \
        -- python jobs/pipeline.py --config jobs/configs/pipeline.yaml output=s3://bucket/run7

A resubmission with the same output skips the stages that finished (see agentflan_ray/jobs/pipeline.py).
Same arguments as ``agentflan-ray pipeline``.
"""

import sys

from agentflan_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["pipeline", *sys.argv[1:]]))
