"""LAG math (paper Eqs. 2-3) and token lookup on small tensors (no host needed)."""
from __future__ import annotations

import pytest
import torch

from perres_core.errors import PerResError
from perres_core.lag import MaskSettings, binarize, concept_attention, concept_columns, concept_masks
from perres_core.tokens import concept_positions, find_subsequence_positions


def test_concept_attention_matches_reference_softmax():
    torch.manual_seed(0)
    heads, dim = 4, 8
    q, k = torch.randn(2, 10, heads * dim), torch.randn(2, 6, heads * dim)
    columns = torch.tensor([1, 3])
    qh = q.view(2, 10, heads, dim).transpose(1, 2)
    kh = k.view(2, 6, heads, dim).transpose(1, 2)
    probs = (qh @ kh.transpose(-1, -2) / dim ** 0.5).softmax(-1)           # (B, h, N, T)
    expected = probs[..., [1, 3]].sum(-1).mean(1)
    torch.testing.assert_close(concept_attention(q, k, heads, columns), expected, rtol=1e-5, atol=1e-6)


def test_median_mask_covers_exactly_half_even_with_ties():
    attention = torch.cat([torch.zeros(1, 32), torch.rand(1, 32)], dim=1).repeat(3, 1)
    attention[1] = 0.5  # all tied
    mask = binarize(attention, MaskSettings())
    assert mask.shape == attention.shape
    assert mask.sum(dim=1).tolist() == [32.0, 32.0, 32.0]
    assert set(mask.unique().tolist()) <= {0.0, 1.0}
    # the kept half is the high-attention half
    assert mask[0, 32:].sum() == 32


def test_quantile_soft_and_constant_modes():
    attention = torch.linspace(0, 1, 100)[None]
    assert binarize(attention, MaskSettings(mode="quantile", quantile=0.9)).sum() == 10
    soft = binarize(attention * 4, MaskSettings(mode="soft"))
    assert soft.max() == 1.0 and soft.min() == 0.0
    assert binarize(attention, MaskSettings(constant=1.0)).min() == 1.0


@pytest.mark.parametrize("settings", [MaskSettings(mode="nope"), MaskSettings(mode="quantile", quantile=1.0)])
def test_bad_mask_settings_are_refused(settings):
    with pytest.raises(PerResError):
        settings.validate()


def test_multi_concept_masks_are_disjoint_and_overlaps_go_to_larger_relative_attention():
    torch.manual_seed(1)
    a, b = torch.rand(2, 64), torch.rand(2, 64) * 0.5
    masks = concept_masks([a, b], MaskSettings())
    assert torch.all(masks[0] * masks[1] == 0)
    both_high = (binarize(a, MaskSettings()) * binarize(b, MaskSettings())).bool()
    relative_a, relative_b = a / a.mean(1, keepdim=True), b / b.mean(1, keepdim=True)
    assert torch.all(masks[0][both_high] == (relative_a >= relative_b)[both_high].float())
    assert not torch.equal(relative_a >= relative_b, a >= b)  # the raw maps would decide differently


def test_a_concept_with_more_tokens_wins_no_more_area():
    """Three tokens attending like one sum to a map three times as large; the masks must not change."""
    torch.manual_seed(2)
    a, b = torch.rand(2, 64), torch.rand(2, 64)
    settings = MaskSettings()
    one_token = concept_masks([a, b], settings)
    for scale in (3.0, 1 / 3):
        scaled = concept_masks([a, b * scale], settings)
        assert all(torch.equal(x, y) for x, y in zip(one_token, scaled))
    areas = [mask.sum().item() for mask in one_token]
    assert min(areas) > 0.3 * max(areas)  # similar maps share the overlap


def test_concept_columns_survive_lcm_repetition():
    # a 77-token prompt repeated to 154 columns when batched with a 154-token negative
    assert concept_columns(154, [5, 6], 77).tolist() == [5, 6, 82, 83]


def test_token_positions_in_chunks_and_split_words():
    chunks = [[0, 10, 11, 12, 1], [0, 12, 20, 21, 1]]
    assert find_subsequence_positions(chunks, [20, 21]) == [7, 8]
    positions, missing = concept_positions(chunks, {"sks": [11], "dog": [12], "cat": [99]})
    assert positions == [2, 3, 6] and missing == ["cat"]
