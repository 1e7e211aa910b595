"""Replies cached by a hash of everything that determines them, beside the output (local or s3://).

A rerun after a crash, or with more input, pays nothing for requests already answered. Replies
that passed validation are stored, and so is a reply still rejected after its re-asks (marked
``rejected``: a rerun makes the same decision without asking again); one small JSON file per reply,
under a two-character fan-out directory.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import uuid

from agentflan_ray.storage import StorageConfig, filesystem, is_s3


def cache_key(model: str, messages: list[dict], params: dict, prompt_version: str) -> str:
    text = json.dumps({"model": model, "messages": messages, "params": params, "prompt_version": prompt_version},
                      sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()


class ResponseCache:
    def __init__(self, root: str, storage: StorageConfig):
        self.uri = root
        self.fs, self.root = filesystem(root, storage)
        self.hits = 0
        self.misses = 0

    def _path(self, key: str) -> str:
        return posixpath.join(self.root, key[:2], f"{key}.json")

    def get(self, key: str) -> dict | None:
        try:
            with self.fs.open_input_stream(self._path(key)) as f:
                value = json.loads(f.read())
        except (FileNotFoundError, json.JSONDecodeError):
            self.misses += 1
            return None
        except OSError as exc:
            if "does not exist" in str(exc) or "NoSuchKey" in str(exc) or "Path does not exist" in str(exc):
                self.misses += 1
                return None
            raise
        self.hits += 1
        return value

    def put(self, key: str, value: dict) -> None:
        path = self._path(key)
        data = json.dumps(value, ensure_ascii=False).encode()
        if is_s3(self.uri):
            with self.fs.open_output_stream(path) as f:  # an S3 PUT is atomic
                f.write(data)
            return
        self.fs.create_dir(posixpath.dirname(path), recursive=True)
        temporary = f"{path}.{uuid.uuid4().hex}.tmp"
        with self.fs.open_output_stream(temporary) as f:
            f.write(data)
        os.replace(temporary, path)  # readers never see half a file
