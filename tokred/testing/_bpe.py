"""Byte-level BPE tokenizers trained in-process, so tiny models need no download."""

from __future__ import annotations

import functools

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

__all__ = ["train_byte_level_bpe"]


@functools.lru_cache(maxsize=None)
def train_byte_level_bpe(corpus: tuple[str, ...], special_tokens: tuple[str, ...], *,
                         unk_token: str | None = None, bos_token: str | None = None) -> str:
    """Train a 400-token byte-level BPE on ``corpus`` once per process and return it as JSON
    (immutable, so callers build fresh tokenizers from it and cannot corrupt the cache).

    ``special_tokens`` become real vocabulary entries; ``bos_token``, when given, is prepended to
    every encoded text (Llama-style tokenizers do this, Qwen's do not).
    """
    tok = Tokenizer(models.BPE(unk_token=unk_token))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer)
    if bos_token is not None:
        bos_id = tok.token_to_id(bos_token)
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos_token} $A", pair=f"{bos_token} $A {bos_token} $B", special_tokens=[(bos_token, bos_id)]
        )
    return tok.to_str()
