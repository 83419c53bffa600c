"""Token ids from the CLIP object the user wired in (the same tokenizer that encodes the prompt)."""
from __future__ import annotations

import re

from ...perres_core.errors import PerResError

WEIGHT_SYNTAX = re.compile(r"[()\[\]{}:\\<>|]")


def prompt_token_chunks(clip, text: str) -> list[list[int]]:
    """The prompt's token ids per chunk (SD1: 77 each, start and end tokens included)."""
    tokens = clip.tokenize(text)
    key = "l" if "l" in tokens else next(iter(tokens))
    return [[int(token[0]) for token in chunk] for chunk in tokens[key]]


def word_token_ids(clip, word: str) -> list[int]:
    """The ids of `word` alone, without what the tokenizer puts around any text: what it gives for an empty
    prompt is that frame (CLIP: start, end, padding; a Qwen chat template: its opening tokens, then its end)."""
    chunk = prompt_token_chunks(clip, word)[0]
    empty = prompt_token_chunks(clip, "")[0] if prompt_token_chunks(clip, "") else []
    opening = next((i for i, (a, b) in enumerate(zip(chunk, empty)) if a != b), min(len(chunk), len(empty)))
    ids = chunk[opening:]
    closing = empty[opening] if len(empty) > opening else None
    return ids[: ids.index(closing)] if closing in ids else ids


def check_concept_word(label: str, word: str, single_word: bool) -> str:
    word = word.strip()
    if not word:
        raise PerResError(f"{label} is empty; give a word such as 'sks' (identifier) or 'dog' (class word).")
    if WEIGHT_SYNTAX.search(word):
        raise PerResError(f"{label} '{word}' contains prompt syntax characters such as ( ) [ ] : ; give the plain word.")
    if single_word and len(word.split()) != 1:
        raise PerResError(f"{label} '{word}' has spaces; the identifier must be one rare word such as 'sks'.")
    return word
