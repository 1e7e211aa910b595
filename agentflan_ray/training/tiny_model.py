"""A tiny Llama-style model and a tokenizer trained on the generated data, for smoke tests.

    agentflan-ray make-tiny-model --data ./out/demo --output ./tiny

No weights are downloaded: the tokenizer is a byte-level BPE trained with ``tokenizers`` on the
sample texts, the model is built from a ``LlamaConfig`` with random weights, and both are written
with ``save_pretrained`` so training loads them through the real ``from_pretrained`` path.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq

from agentflan_ray.storage import StorageConfig, filesystem
from agentflan_ray.writing.manifest import sample_shards

SPECIAL = ["<s>", "</s>", "<pad>", "<unk>", "<|Human|>", "<|Assistant|>", "\u0d46", "\u0d3f"]
# Each turn ends with </s>: the end marker the assistant learns to emit.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def sample_texts(data_dir: str, limit: int = 5000, storage: StorageConfig | None = None) -> list[str]:
    storage = storage or StorageConfig()
    fs, _ = filesystem(data_dir, storage)
    texts: list[str] = []
    for path in sample_shards(data_dir, storage):
        for row in pq.read_table(path, columns=["messages"], filesystem=fs).to_pylist():
            texts += [m["content"] for m in row["messages"]]
            if len(texts) >= limit:
                return texts
    if not texts:
        raise FileNotFoundError(f"the sample shards under {data_dir} hold no rows")
    return texts


def train_tokenizer(texts: list[str], vocab_size: int = 2000):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", unk_token="<unk>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def make_tiny_model(data_dir: str, output: str, hidden: int = 64, layers: int = 2, vocab_size: int = 2000,
                    seed: int = 0, storage: StorageConfig | None = None) -> str:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = train_tokenizer(sample_texts(data_dir, storage=storage), vocab_size)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden * 4, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config)
    Path(output).mkdir(parents=True, exist_ok=True)
    model.save_pretrained(output)
    tokenizer.save_pretrained(output)
    return output
