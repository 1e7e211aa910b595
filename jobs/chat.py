"""Entrypoint for ``ray job submit``: answer a file of chat requests on the cluster.

    ray job submit --address http://HEAD:8265 --working-dir . \
        -- python jobs/chat.py --config jobs/configs/chat_demo.yaml llm.base_url=https://api.openai.com/v1 llm.rpm=5000

The key is read on the driver from the variable ``llm.api_key_env`` names (OPENAI_API_KEY by
default), so set it in the head node's environment; workers get it from the driver, never from
logs or config. Same arguments as ``agentflan-ray chat``.
"""

import sys

from agentflan_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["chat", *sys.argv[1:]]))
