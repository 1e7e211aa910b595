"""Where replies come from: any OpenAI-compatible endpoint, or a Hugging Face model directory.

    EndpointTask   the LLM stage's task: one case -> its reply, through the client (budget, retries,
                   cache, dead letters); every reply is taken as it is, empty and cut-off ones too.
                   A case row with ``tools`` has them passed as ``tools=`` (``native_schemas``), the
                   reply's ``tool_calls`` kept; an endpoint that answers that request 400 is asked
                   again without them (``native`` "fallback")
    HFGenerate     a callable class for ``map_batches`` on an actor pool: the model's chat template,
                   left-padded batched greedy generation, CPU or GPU (``num_gpus`` per actor)

Both return rows ``{id, reply, finish_reason, error}``; the endpoint's also ``tool_calls`` (JSON text,
"" for none) and ``native`` ("" not asked natively, "on", "fallback").
"""

from __future__ import annotations

import json
import os
import re
import tempfile

import pyarrow as pa

REPLY_SCHEMA = pa.schema([("id", pa.string()), ("reply", pa.string()), ("finish_reason", pa.string()),
                          ("error", pa.string()), ("tool_calls", pa.string()), ("native", pa.string())])
# messages as JSON text; tools: JSON text of the tool schemas to pass as tools= ("" for none)
CASE_ROW_SCHEMA = pa.schema([("id", pa.string()), ("messages", pa.string()), ("tools", pa.string())])
NOT_IN_NAMES = re.compile(r"[^A-Za-z0-9_-]")  # what OpenAI does not take in a function name


class EndpointTask:
    async def rows(self, row: dict, complete) -> list[dict]:
        import openai

        messages, tools, native = json.loads(row["messages"]), json.loads(row.get("tools") or "[]"), ""
        schemas, names = native_schemas(tools)
        try:
            completion = await complete(messages, None, None, strict=False, tools=schemas or None)
            native = "on" if schemas else ""
        except openai.BadRequestError:
            if not schemas:
                raise
            completion, native = await complete(messages, None, None, strict=False), "fallback"
        calls = [{**call, "function": {**call["function"], "name": names.get(call["function"]["name"],
                                                                              call["function"]["name"])}}
                 for call in completion.tool_calls]
        return [{"id": row["id"], "reply": completion.content, "finish_reason": completion.finish_reason, "error": "",
                 "tool_calls": json.dumps(calls, ensure_ascii=False) if calls else "", "native": native}]

    def failed(self, row: dict, outcome: str, reason: str, detail: str) -> dict:
        return {"id": row["id"], "reply": "", "finish_reason": "", "error": f"{reason}: {detail}"[:500],
                "tool_calls": "", "native": ""}


def native_schemas(tools: list[dict]) -> tuple[list[dict], dict[str, str]]:
    """The tool schemas under names OpenAI takes (letters, digits, ``_``, ``-``; at most 64), so
    ``weather.get_x`` is sent as ``weather_get_x``; and ``{sent name: the case's name}`` to read the
    reply's calls back with."""
    schemas, names = [], {}
    for tool in tools:
        name = tool["function"]["name"]
        sent = NOT_IN_NAMES.sub("_", name)[:64]
        while sent in names:  # two names that differ only where "_" replaced something
            sent = f"{sent[:58]}_{len(names)}"
        names[sent] = name
        schemas.append({**tool, "function": {**tool["function"], "name": sent}})
    return schemas, names


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
