"""Where replies come from: any OpenAI-compatible endpoint, or a Hugging Face model directory.

    EndpointTask   the LLM stage's task: one case -> its reply, through the client (budget, retries,
                   cache, dead letters); every reply is taken as it is, empty and cut-off ones too.
                   A case row with ``tools`` has them passed as ``tools=`` (``native_schemas``), the
                   reply's ``tool_calls`` kept; an endpoint that answers that request 400 is asked
                   again without them (``native`` "fallback")
    HFGenerate     a callable class for ``map_batches`` on an actor pool: the model's chat template,
                   batched greedy generation (a prompt prefix the rows share run once, right
                   padding, a row that ends leaves its batch), CPU or GPU (``num_gpus`` per actor);
                   a batch that fails runs row by row, and a row that fails alone is dead-lettered
                   (``context_length_exceeded`` past the model's positions, else ``generation_failed``)

Both return rows ``{id, reply, finish_reason, error}``; the endpoint's also ``tool_calls`` (JSON text,
"" for none) and ``native`` ("" not asked natively, "on", "fallback").
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import os
import re
import tempfile

import pyarrow as pa

REPLY_SCHEMA = pa.schema([("id", pa.string()), ("reply", pa.string()), ("finish_reason", pa.string()),
                          ("error", pa.string()), ("tool_calls", pa.string()), ("native", pa.string())])
# messages as JSON text; tools: JSON text of the tool schemas to pass as tools= ("" for none)
CASE_ROW_SCHEMA = pa.schema([("id", pa.string()), ("messages", pa.string()), ("tools", pa.string())])
NOT_IN_NAMES = re.compile(r"[^A-Za-z0-9_-]")  # what OpenAI does not take in a function name
# The rows' own tokens attend to a shared prefix through an explicit mask, several times dearer per
# token than causal attention (3.5x on CPU), so a prefix is run once for several rows only where it is
# this many times longer than the longest row's own part.
SHARED_AT_LEAST = 4
logger = logging.getLogger(__name__)


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


@contextlib.contextmanager
def local_model(model: str, storage):
    """A model directory on this node while the block runs: as given, or a copy of an ``s3://`` one
    in a temporary directory, removed after it (once loaded, the model no longer needs its files)."""
    if not model.startswith("s3://"):
        yield model
        return
    import pyarrow.fs as pafs

    from agentflan_ray.storage import filesystem

    fs, base = filesystem(model, storage)
    with tempfile.TemporaryDirectory(prefix="afr-model-") as target:
        pafs.copy_files(base, target, source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
        yield target


class HFGenerate:
    """Greedy generation for a batch of cases; rows ``{id, messages}`` -> reply rows, each reply
    the one the model's ``generate`` gives that case alone (float rounding aside).

    The prompts (the model's chat template) of three cases that share a system prompt and its tools
    (``P``), each with its own turn (``u``), right-padded (``.``)::

        P P P P P P | u u u .      prefill: the shared prefix once (batch of one), its cache
        P P P P P P | u u . .      copied to every row; then the rows' own tokens, right-padded
        P P P P P P | u u u u      decode: one token per row per step, pads masked out

    The rows of a batch that share no prefix worth it (``prefix_groups``) are prefilled together the
    same way with no prefix; then all the batch's rows decode together, each group's cache padded on
    the right to the longest. Pads only ever follow a row's tokens, so the prefill needs causal
    attention alone: no dense padded mask, and the attention kernel skips the upper triangle (left
    padding made a batch of eight long prompts 3.5x slower to prefill than the eight one by one, on
    CPU). A row that emits an end marker (the tokenizer's or any of the generation config's) leaves
    the batch.
    """

    def __init__(self, model: str, storage, max_new_tokens: int, device: str = "auto"):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        self.device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
        dtype = torch.bfloat16 if self.device == "cuda" else torch.float32
        with local_model(model, storage) as path:
            self.tokenizer = AutoTokenizer.from_pretrained(path)
            self.model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(self.device).eval()
        self.max_new_tokens = max_new_tokens
        self.eos = end_markers(self.tokenizer, self.model.generation_config)
        pad = self.tokenizer.pad_token_id
        self.pad = pad if pad is not None else min(self.eos)
        accepts = inspect.signature(self.model.forward).parameters
        self.cache_arg = "cache" if "cache" in accepts else "past_key_values"  # renamed in transformers 5
        self.keeps_logits = "logits_to_keep" in accepts
        self.window = attention_window(self.model.config)

    def prompt(self, messages: list[dict]) -> str:
        """The model's chat template over the conversation. A template that refuses a system turn
        (Gemma's) gets it folded into the first user turn, as those models are prompted."""
        if not self.tokenizer.chat_template:
            return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant: "
        try:
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception:
            folded = without_system_turn(messages)
            if folded == messages:
                raise
            return self.tokenizer.apply_chat_template(folded, tokenize=False, add_generation_prompt=True)

    def encode(self, messages: list[dict]) -> list[int] | str:
        """The prompt's token ids, or why there are none (the case is dead-lettered)."""
        try:
            return self.tokenizer(self.prompt(messages), add_special_tokens=False).input_ids
        except Exception as exc:  # a chat template that refuses the conversation
            return f"template_failed: {type(exc).__name__}: {exc}"[:500]

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        prompts = [self.encode(json.loads(row["messages"])) for row in rows]
        outputs = iter(self.run([prompt for prompt in prompts if isinstance(prompt, list)]))
        replies = []
        for row, prompt in zip(rows, prompts, strict=True):
            output = next(outputs) if isinstance(prompt, list) else prompt
            if isinstance(output, (str, Exception)):
                error = output if isinstance(output, str) else f"{self.failure(prompt)}: {type(output).__name__}: {output}"
                replies.append({"id": row["id"], "reply": "", "finish_reason": "", "error": error[:500]})
                continue
            tokens, ended = output
            replies.append({"id": row["id"], "reply": self.tokenizer.decode(tokens, skip_special_tokens=True),
                            "finish_reason": "stop" if ended else "length", "error": ""})
        return pa.Table.from_pylist(replies, schema=REPLY_SCHEMA)

    def run(self, prompts: list[list[int]]) -> list:
        """``generate``'s outputs; where the rows must run apart (``apart``) or the batch fails (a
        row the model cannot take, a batch too big for memory), each row's alone: its output or the
        exception it raised."""
        import torch

        if not prompts:
            return []
        with torch.inference_mode():
            if self.apart(prompts):
                return [self.alone(prompt) for prompt in prompts]
            try:
                return self.generate(prompts)
            except Exception as exc:
                self.release()
                if len(prompts) == 1:
                    return [exc]
                logger.warning("a batch of %d failed (%s: %s); its rows run one by one", len(prompts),
                               type(exc).__name__, str(exc)[:200])
                return [self.alone(prompt) for prompt in prompts]

    def alone(self, prompt: list[int]):
        """One prompt's ``generate`` output, or the exception it raised (the case is dead-lettered)."""
        try:
            return self.generate([prompt])[0]
        except Exception as exc:
            self.release()
            return exc

    def failure(self, prompt: list[int]) -> str:
        """The dead-letter reason of a row that failed alone."""
        context = getattr(self.model.config, "max_position_embeddings", None)
        return "context_length_exceeded" if context and len(prompt) + self.max_new_tokens > context else "generation_failed"

    def release(self) -> None:
        """Give back the GPU memory a failed batch held."""
        import torch

        if self.device == "cuda":
            torch.cuda.empty_cache()

    def generate(self, prompts: list[list[int]]) -> list[tuple[list[int], bool]]:
        """Each prompt's greedy continuation up to its end marker (excluded), and whether it ended.
        Each prefix group (``prefix_groups``) is prefilled apart, then all rows decode as one batch
        (their caches right-padded to one length), so a group costs no extra forward per token.
        A row that ends leaves the batch, so the rest do not pay for it. Pads sit between a row's
        prompt and its reply, which only layers that attend to every position can ignore (``apart``)."""
        import torch

        groups = prefix_groups(prompts)
        order = [row for rows, _ in groups for row in rows]  # the rows as the decode batch holds them
        logits, cache, mask = merge_prefills([self.prefill([prompts[row] for row in rows], shared)
                                              for rows, shared in groups])
        lengths = torch.tensor([len(prompts[row]) for row in order], device=self.device)
        padded = bool((mask == 0).any())  # else no mask: a row alone has none, as in generate()
        alive = list(range(len(order)))  # the decode batch's rows still generating
        tokens, ended = [[] for _ in order], [False] * len(order)
        for step in range(self.max_new_tokens):
            chosen = logits.argmax(-1)
            for row, token in zip(alive, chosen.tolist(), strict=True):
                if token in self.eos:
                    ended[row] = True
                else:
                    tokens[row].append(token)
            going = [i for i, row in enumerate(alive) if not ended[row]]
            if not going or step + 1 == self.max_new_tokens:
                break
            if len(going) < len(alive):
                index = torch.tensor(going, device=self.device)
                cache.batch_select_indices(index)
                chosen, mask, lengths, alive = chosen[index], mask[index], lengths[index], [alive[i] for i in going]
            mask = torch.cat([mask, mask.new_ones(len(alive), 1)], dim=1)
            logits, cache = self.forward(chosen[:, None], cache, attention_mask=mask if padded else None,
                                         position_ids=(lengths + step)[:, None])
            logits = logits[:, -1]
        outputs: list = [None] * len(prompts)
        for position, row in enumerate(order):
            outputs[row] = (tokens[position], ended[position])
        return outputs

    def apart(self, prompts: list[list[int]]) -> bool:
        """Whether these prompts must run one by one, the pads of a batch being in the way: a window
        (``attention_window``) shorter than the longest prompt and reply, or layers that are not all
        attention."""
        if len(prompts) < 2 or self.window is None:
            return False
        return self.window == 0 or max(map(len, prompts)) + self.max_new_tokens > self.window

    def prefill(self, prompts: list[list[int]], shared: int):
        """The logits for each row's first generated token, the cache, and the attention mask (1 on a
        row's tokens, 0 on its pads)."""
        import torch

        rows, device, cache = len(prompts), self.device, None
        if shared:
            _, cache = self.forward(torch.tensor([prompts[0][:shared]], device=device), None,
                                    keep=1 if self.keeps_logits else None)
            cache.batch_repeat_interleave(rows)
        own = [prompt[shared:] for prompt in prompts]
        width = max(map(len, own))
        tokens = torch.tensor([ids + [self.pad] * (width - len(ids)) for ids in own], device=device)
        last = torch.tensor([len(ids) - 1 for ids in own], device=device)  # each row's last prompt token
        positions = torch.arange(shared, shared + width, device=device).expand(rows, -1)
        keep = torch.unique(last)  # logits at these positions only, not width x vocabulary per row
        logits, cache = self.forward(tokens, cache, position_ids=positions, keep=keep if self.keeps_logits else None)
        logits = logits[torch.arange(rows, device=device), torch.searchsorted(keep, last) if self.keeps_logits else last]
        mask = torch.cat([torch.ones(rows, shared, dtype=torch.long, device=device),
                          (torch.arange(width, device=device) <= last[:, None]).long()], dim=1)
        return logits, cache, mask

    def forward(self, tokens, cache, keep=None, **inputs):
        """Logits and the cache after ``tokens``; without a mask the model attends causally."""
        if keep is not None:
            inputs["logits_to_keep"] = keep
        out = self.model(input_ids=tokens, use_cache=True, **{self.cache_arg: cache}, **inputs)
        return out.logits, out[self.cache_arg]


def without_system_turn(messages: list[dict]) -> list[dict]:
    """The conversation with a leading system turn folded into the first user turn (or made one)."""
    if not messages or messages[0].get("role") != "system":
        return messages
    system, rest = messages[0], messages[1:]
    if rest and rest[0].get("role") == "user":
        return [{**rest[0], "content": f"{system['content']}\n\n{rest[0]['content']}"}, *rest[1:]]
    return [{**system, "role": "user"}, *rest]


def batch_order(row: dict) -> tuple:
    """Sort key for case rows before batching: cases with the same first message (a system prompt
    and its tools) together, so a batch shares it as a prefix; shorter ones first, so the rows of a
    batch are about as long."""
    messages = json.loads(row["messages"])
    first = messages[0]["content"] if messages and isinstance(messages[0].get("content"), str) else ""
    return len(first), first, len(row["messages"])


def prefix_groups(prompts: list[list[int]]) -> list[tuple[list[int], int]]:
    """The rows of a batch as ``(rows, shared)`` groups: rows whose prompts share a prefix worth
    running once (``SHARED_AT_LEAST`` times longer than the longest row's own part), and last the
    rest together with ``shared`` 0. Each row keeps at least one token of its own, whose logits give
    its first generated token. (Groups are prefilled apart and decode together.)"""
    order = sorted(range(len(prompts)), key=lambda row: prompts[row])  # shared prefixes side by side
    groups, alone, run, shared = [], [], [], 0

    def close():
        if len(run) > 1:
            groups.append((run, shared))
        else:
            alone.extend(run)

    for row in order:
        prompt = prompts[row]
        if run:
            first, same = prompts[run[0]], 0
            limit = min(shared, len(prompt) - 1)
            while same < limit and first[same] == prompt[same]:
                same += 1
            if same >= SHARED_AT_LEAST * max(len(prompts[other]) - same for other in [*run, row]):
                run, shared = [*run, row], same
                continue
            close()
        run, shared = [row], len(prompt) - 1
    close()
    if alone:
        groups.append((sorted(alone), 0))
    return groups


def merge_prefills(prefills: list[tuple]) -> tuple:
    """One ``(logits, cache, mask)`` for the rows of several prefills: each cache's keys and values
    right-padded with zeros to the longest (masked out, as a row's own pads are) and stacked along
    the batch, in the order given."""
    import torch
    import torch.nn.functional as F

    if len(prefills) == 1:
        return prefills[0]
    width = max(mask.shape[1] for _, _, mask in prefills)
    merged = []
    for layer in zip(*(cache_tensors(cache) for _, cache, _ in prefills), strict=True):  # its [keys, values] per prefill
        merged.append([torch.cat([F.pad(tensor, (0, 0, 0, width - tensor.shape[-2])) for tensor in kind])
                       for kind in zip(*layer, strict=True)])
    cache = prefills[0][1]
    set_cache_tensors(cache, merged)
    logits = torch.cat([logits for logits, _, _ in prefills])
    mask = torch.cat([F.pad(mask, (0, width - mask.shape[1])) for _, _, mask in prefills])
    return logits, cache, mask


def attention_window(config) -> int | None:
    """How many positions back the model's shortest-sighted layers attend (Mistral's and Gemma's
    sliding windows); None where every layer attends to all; 0 where a layer is not attention at
    all (a recurrent or chunked one: pads would run through its state)."""
    types = getattr(config, "layer_types", None)
    window = getattr(config, "sliding_window", None) or None
    if types is not None:
        if set(types) - {"full_attention", "sliding_attention"}:
            return 0
        return window if "sliding_attention" in types else None
    return None if getattr(config, "use_sliding_window", True) is False else window


def cache_tensors(cache) -> list[list]:
    """``[keys, values]`` of each layer of a ``DynamicCache`` (shaped batch, heads, positions, dim)."""
    if hasattr(cache, "layers"):  # transformers >= 4.56
        return [[layer.keys, layer.values] for layer in cache.layers]
    return [[keys, values] for keys, values in zip(cache.key_cache, cache.value_cache, strict=True)]


def set_cache_tensors(cache, tensors: list[list]) -> None:
    if hasattr(cache, "layers"):
        for layer, (keys, values) in zip(cache.layers, tensors, strict=True):
            layer.keys, layer.values = keys, values
            if hasattr(layer, "cumulative_length"):  # a sliding layer not yet full (attention_window)
                layer.cumulative_length = keys.shape[-2]
    else:
        cache.key_cache[:] = [keys for keys, _ in tensors]
        cache.value_cache[:] = [values for _, values in tensors]
        if hasattr(cache, "_seen_tokens"):
            cache._seen_tokens = tensors[0][0].shape[-2]


def end_markers(tokenizer, generation_config) -> set[int]:
    """Every token that ends a reply: the tokenizer's end marker and the generation config's (an id
    or a list, as Llama 3's end-of-turn beside end-of-text)."""
    configured = getattr(generation_config, "eos_token_id", None)
    ids = {tokenizer.eos_token_id, *(configured if isinstance(configured, list) else [configured])}
    ids.discard(None)
    if not ids:
        raise ValueError("the model has no end marker: neither its tokenizer nor its generation config names one")
    return ids
