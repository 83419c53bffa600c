"""Finding the concept words among a prompt's tokens.

Tokens come from the host's own tokenizer as chunks (CLIP: 77 per chunk, each with its start and end
tokens), so a position is chunk·chunk_length + offset, which is the column of the concatenated
context that the UNet sees.
"""
from __future__ import annotations

from typing import Sequence


def find_subsequence_positions(chunks: Sequence[Sequence[int]], needle: Sequence[int]) -> list[int]:
    """Every flattened position covered by an occurrence of `needle` (a word's BPE tokens) in `chunks`."""
    if not needle:
        return []
    positions: list[int] = []
    offset = 0
    for chunk in chunks:
        ids = list(chunk)
        for start in range(len(ids) - len(needle) + 1):
            if ids[start:start + len(needle)] == list(needle):
                positions.extend(offset + start + i for i in range(len(needle)))
        offset += len(ids)
    return sorted(set(positions))


def concept_positions(chunks: Sequence[Sequence[int]],
                      words: dict[str, Sequence[int] | Sequence[Sequence[int]]]) -> tuple[list[int], list[str]]:
    """Positions of all given words, and the words that do not occur in the prompt. A word's ids may come as
    several spellings (a byte-level BPE such as Qwen's encodes a word after a space differently from one at the
    start of the text): every occurrence of any of them counts."""
    positions: set[int] = set()
    missing: list[str] = []
    for word, needle in words.items():
        spellings = needle if needle and not isinstance(needle[0], int) else [needle]
        found = sorted({p for ids in spellings for p in find_subsequence_positions(chunks, ids)})
        if found:
            positions.update(found)
        else:
            missing.append(word)
    return sorted(positions), missing
