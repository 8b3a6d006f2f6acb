"""Tiny random models and a tiny tokenizer, built from configs, for tests and smoke runs.

Nothing here touches the network: the tokenizer is a byte-level BPE trained in memory on a
fixed corpus, so " A" after "Answer:" is one token as it is for real Llama-3/SmolLM2 tokenizers.

Example::

    >>> tok = tiny_tokenizer()
    >>> model = tiny_llama(vocab_size=len(tok))
    >>> model.config.num_hidden_layers
    2
"""

from __future__ import annotations

from functools import lru_cache

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    BertConfig,
    BertForMaskedLM,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

_CORPUS = [
    "The following are multiple choice questions (with answers) about",
    "Answer: A\n\nAnswer: B\n\nAnswer: C\n\nAnswer: D\n\n",
    "A. B. C. D. A B C D",
    "abstract algebra anatomy astronomy business ethics clinical knowledge college biology",
    "high school mathematics computer security moral scenarios philosophy prehistory virology",
    "What is the value of x? Which of the following is true? Find the degree of the field.",
    "0 1 2 3 4 5 6 7 8 9 10 100 True False None all of the above",
    "It is great terrible good bad movie film positive negative Yes No Maybe",
]
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>", "<mask>"]


@lru_cache(maxsize=1)
def _trained_tokenizer_json() -> str:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    return tok.to_str()


def tiny_tokenizer(padding_side: str = "right", add_bos: bool = True) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with ~512 tokens and pad/bos/eos/mask tokens.

    Args:
        padding_side: ``"left"`` or ``"right"``.
        add_bos: prepend ``<s>`` when ``add_special_tokens=True`` (as Llama tokenizers do).
    """
    from tokenizers import processors

    tok = Tokenizer.from_str(_trained_tokenizer_json())
    if add_bos:
        bos_id = tok.token_to_id("<s>")
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos_id)]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        mask_token="<mask>",
        padding_side=padding_side,
    )


def tiny_llama(
    vocab_size: int = 512,
    num_layers: int = 2,
    hidden_size: int = 32,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 64,
    max_position_embeddings: int = 512,
    seed: int = 0,
) -> LlamaForCausalLM:
    """A randomly initialised Llama causal LM (fp32, eval mode), reproducible from ``seed``."""
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def tiny_bert(
    vocab_size: int = 512,
    num_layers: int = 2,
    hidden_size: int = 32,
    num_heads: int = 4,
    intermediate_size: int = 64,
    seed: int = 0,
) -> BertForMaskedLM:
    """A randomly initialised BERT masked LM (fp32, eval mode), reproducible from ``seed``."""
    config = BertConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=512,
        pad_token_id=0,
    )
    torch.manual_seed(seed)
    return BertForMaskedLM(config).eval()


def save_tiny_llama(path: str, **kwargs) -> str:
    """Write a tiny Llama and the tiny tokenizer as an HF model folder; returns the path."""
    tok = tiny_tokenizer()
    model = tiny_llama(vocab_size=len(tok), **kwargs)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path
