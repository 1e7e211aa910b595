"""Where replies come from: any OpenAI-compatible endpoint, or a Hugging Face model directory.

    EndpointTask   the LLM stage's task: one case -> its reply, through the client (budget, retries,
                   cache, dead letters); every reply is taken as it is, empty and cut-off ones too
    HFGenerate     a callable class for ``map_batches`` on an actor pool: the model's chat template,
                   left-padded batched greedy generation, CPU or GPU (``num_gpus`` per actor)

Both return rows ``{id, reply, finish_reason, error}``.
"""

from __future__ import annotations

import json
import os
import tempfile

import pyarrow as pa

REPLY_SCHEMA = pa.schema([("id", pa.string()), ("reply", pa.string()), ("finish_reason", pa.string()),
                          ("error", pa.string())])
CASE_ROW_SCHEMA = pa.schema([("id", pa.string()), ("messages", pa.string())])  # messages as JSON text


class EndpointTask:
    async def rows(self, row: dict, complete) -> list[dict]:
        completion = await complete(json.loads(row["messages"]), None, None, strict=False)
        return [{"id": row["id"], "reply": completion.content, "finish_reason": completion.finish_reason, "error": ""}]

    def failed(self, row: dict, outcome: str, reason: str, detail: str) -> dict:
        return {"id": row["id"], "reply": "", "finish_reason": "", "error": f"{reason}: {detail}"[:500]}


def local_model(model: str, storage) -> str:
    """A model directory on this node: as given, or copied from ``s3://`` once per process."""
    if not model.startswith("s3://"):
        return model
    import pyarrow.fs as pafs

    from agentflan_ray.storage import filesystem

    fs, base = filesystem(model, storage)
    target = tempfile.mkdtemp(prefix="afr-model-")
    pafs.copy_files(base, target, source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    return target


class HFGenerate:
    def __init__(self, model: str, storage, max_new_tokens: int, device: str = "auto"):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = local_model(model, storage)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
        dtype = torch.bfloat16 if self.device == "cuda" else torch.float32
        self.model = AutoModelForCausalLM.from_pretrained(path, torch_dtype=dtype).to(self.device).eval()
        self.max_new_tokens = max_new_tokens
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    def prompt(self, messages: list[dict]) -> str:
        if self.tokenizer.chat_template:
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant: "

    def __call__(self, batch: pa.Table) -> pa.Table:
        import torch

        rows = batch.to_pylist()
        prompts = [self.prompt(json.loads(r["messages"])) for r in rows]
        inputs = self.tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(self.device)
        with torch.no_grad():
            output = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False,
                                         pad_token_id=self.tokenizer.pad_token_id)
        new = output[:, inputs["input_ids"].shape[1]:]
        replies = []
        for row, tokens in zip(rows, new, strict=True):
            ended = self.tokenizer.eos_token_id in tokens.tolist()
            replies.append({"id": row["id"], "reply": self.tokenizer.decode(tokens, skip_special_tokens=True),
                            "finish_reason": "stop" if ended else "length", "error": ""})
        return pa.Table.from_pylist(replies, schema=REPLY_SCHEMA)
