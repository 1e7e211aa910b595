"""Entrypoint for ``ray job submit``: DeepSpeed SFT with Ray Train over generated shards.

    ray job submit --address http://HEAD:8265 --working-dir . \
        -- python jobs/train.py --config jobs/configs/train_demo.yaml data=s3://bucket/run1 \
           model=meta-llama/Llama-2-7b-chat-hf use_gpu=true num_workers=8 storage_path=s3://bucket/ckpt

Same arguments as ``agentflan-ray train``.
"""

import sys

from agentflan_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
