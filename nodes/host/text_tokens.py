"""Token ids from the CLIP object the user wired in (the same tokenizer that encodes the prompt)."""
from __future__ import annotations

import re
from typing import Optional

from ...perres_core.errors import PerResError

WEIGHT_SYNTAX = re.compile(r"[()\[\]{}:\\<>|]")


def prompt_token_chunks(clip, text: str, key: Optional[str] = None) -> list[list[int]]:
    """The prompt's token ids per chunk (SD1: 77 each, start and end tokens included), from the tokenizer output
    `key` (a family's TextAttention.prompt_tokens: the ids that line up with the denoiser's text tokens), by
    default CLIP-L's or the only one."""
    tokens = clip.tokenize(text)
    if key is None or key not in tokens:
        key = "l" if "l" in tokens else next(iter(tokens))
    return [[int(token[0]) for token in chunk] for chunk in tokens[key]]


def word_token_ids(clip, word: str, key: Optional[str] = None) -> list[int]:
    """The ids of `word` alone, without what the tokenizer puts around any text: what it gives for an empty
    prompt is that frame (CLIP: start, end, padding; a Qwen chat template: its opening tokens, then its end)."""
    chunk = prompt_token_chunks(clip, word, key)[0]
    empty_chunks = prompt_token_chunks(clip, "", key)
    empty = empty_chunks[0] if empty_chunks else []
    opening = next((i for i, (a, b) in enumerate(zip(chunk, empty)) if a != b), min(len(chunk), len(empty)))
    ids = chunk[opening:]
    closing = empty[opening] if len(empty) > opening else None
    return ids[: ids.index(closing)] if closing in ids else ids


def word_spellings(clip, word: str, key: Optional[str] = None) -> list[list[int]]:
    """The ids of `word` at the start of a text and after a space (different in byte-level BPEs such as Qwen's;
    the same in CLIP's and T5's): what to look for in a prompt."""
    alone = word_token_ids(clip, word, key)
    after_space = word_token_ids(clip, f"a {word}", key)
    lead = word_token_ids(clip, "a", key)
    spaced = after_space[len(lead):] if after_space[:len(lead)] == lead else after_space
    return [alone] if spaced == alone or not spaced else [alone, spaced]


def check_concept_word(label: str, word: str, single_word: bool) -> str:
    word = word.strip()
    if not word:
        raise PerResError(f"{label} is empty; give a word such as 'sks' (identifier) or 'dog' (class word).")
    if WEIGHT_SYNTAX.search(word):
        raise PerResError(f"{label} '{word}' contains prompt syntax characters such as ( ) [ ] : ; give the plain word.")
    if single_word and len(word.split()) != 1:
        raise PerResError(f"{label} '{word}' has spaces; the identifier must be one rare word such as 'sks'.")
    return word
