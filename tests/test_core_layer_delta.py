"""Layer changes in residual form and the LAG roles of SD1.x layers (perres_core, no host needed)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from perres_core.families import ANIMA, KREA2, SD1, SDXL
from perres_core.lag_layers import Role, level_sizes, placement
from perres_core.layer_delta import ConvGeometry, DeltaSum, DenseDelta, LowRankDelta, attention


def test_low_rank_conv_delta_equals_the_merged_weight_with_the_layers_geometry():
    """A LoCon 3×3, stride-2 factor pair gives the same output as the merged ΔW convolved like the layer."""
    g = torch.Generator().manual_seed(0)
    conv = torch.nn.Conv2d(8, 6, 3, stride=2, padding=1)
    up, down = torch.randn(6, 2, 1, 1, generator=g), torch.randn(2, 8, 3, 3, generator=g)
    delta = LowRankDelta(up, down, scale=0.5, geometry=ConvGeometry.of(conv))
    x = torch.randn(2, 8, 9, 7, generator=g)
    merged = 0.5 * (up.flatten(1) @ down.flatten(1)).reshape(6, 8, 3, 3)
    torch.testing.assert_close(delta(x), F.conv2d(x, merged, stride=2, padding=1))
    assert delta(x).shape == conv(x).shape


def test_mask_on_the_rank_intermediate_equals_the_masked_output():
    g = torch.Generator().manual_seed(1)
    up, down = torch.randn(5, 3, generator=g), torch.randn(3, 4, generator=g)
    x = torch.randn(2, 10, 4, generator=g)
    mask = (torch.rand(2, 10, 1, generator=g) > 0.5).float()
    delta = LowRankDelta(up, down)
    torch.testing.assert_close(delta(x, mask), mask * delta(x))
    assert torch.equal(delta(x, torch.zeros_like(mask)), torch.zeros(2, 10, 5))


def test_dense_delta_computes_once_per_device_and_handles_bias():
    calls = []

    def compute(device):
        calls.append(device)
        return torch.ones(3, 2)

    weight = DenseDelta(compute)
    bias = DenseDelta(lambda device: torch.tensor([1.0, 2.0, 3.0]), is_bias=True)
    x = torch.ones(4, 2)
    both = DeltaSum((weight, bias))
    torch.testing.assert_close(both(x), torch.full((4, 3), 2.0) + torch.tensor([1.0, 2.0, 3.0]))
    both(x.double())
    assert calls == [torch.device("cpu")]          # the fp64 call reuses the fp32 ΔW
    conv_bias = DenseDelta(lambda device: torch.tensor([1.0, -1.0]), geometry=ConvGeometry(), is_bias=True)
    mask = torch.zeros(1, 1, 2, 2)
    mask[..., 0, 0] = 1
    out = conv_bias(torch.zeros(1, 4, 2, 2), mask)
    assert out.shape == (1, 2, 2, 2) and out[0, :, 0, 0].tolist() == [1.0, -1.0] and out[0, :, 1, 1].abs().sum() == 0


def test_attention_is_softmax_qk_v_per_head():
    g = torch.Generator().manual_seed(2)
    q, k, v = torch.randn(1, 5, 8, generator=g), torch.randn(1, 7, 8, generator=g), torch.randn(1, 7, 8, generator=g)
    heads = 2
    expected = []
    for h in range(heads):
        s = slice(4 * h, 4 * h + 4)
        weights = torch.softmax(q[..., s] @ k[..., s].transpose(1, 2) / 2.0, dim=-1)
        expected.append(weights @ v[..., s])
    torch.testing.assert_close(attention(q, k, v, heads), torch.cat(expected, dim=-1))


@pytest.mark.parametrize("path, role", [
    ("input_blocks.1.1.proj_out", Role.AFTER),
    ("input_blocks.1.1.transformer_blocks.0.attn2.to_out.0", Role.AFTER),
    ("output_blocks.11.1.transformer_blocks.0.ff.net.0.proj", Role.AFTER),
    ("middle_block.1.transformer_blocks.0.attn2.to_k", Role.TEXT),
    ("middle_block.1.transformer_blocks.0.attn2.to_v", Role.TEXT),
    ("input_blocks.1.1.proj_in", Role.BEFORE),
    ("input_blocks.1.1.transformer_blocks.0.attn1.to_v", Role.BEFORE),
    # the mask is made at attn2.to_q, from its base output, before its own change is added
    ("input_blocks.1.1.transformer_blocks.0.attn2.to_q", Role.AFTER),
    ("input_blocks.1.0.in_layers.2", Role.SPATIAL),
    ("input_blocks.3.0.op", Role.SPATIAL),
    ("out.2", Role.SPATIAL),
    ("input_blocks.1.0.emb_layers.1", Role.EMBEDDING),
    ("time_embed.0", Role.GLOBAL),
])
def test_every_kind_of_layer_has_its_role(path, role):
    where = placement(path, SD1)
    assert where.role is role
    if role in (Role.AFTER, Role.TEXT, Role.BEFORE):
        assert path.startswith(where.slot.path + ".")
    if role is Role.EMBEDDING:
        assert where.resblock == "input_blocks.1.0"


def test_level_sizes_follow_the_stride_two_downsamplers():
    assert level_sizes(64, 64) == [(64, 64), (32, 32), (16, 16), (8, 8)]
    assert level_sizes(9, 5) == [(9, 5), (5, 3), (3, 2), (2, 1)]
    x = torch.zeros(1, 1, 9, 5)
    conv = torch.nn.Conv2d(1, 1, 3, stride=2, padding=1)
    for size in level_sizes(9, 5)[1:]:
        x = conv(x)
        assert tuple(x.shape[-2:]) == size


@pytest.mark.parametrize("path, role, block", [
    ("middle_block.1.proj_out", Role.AFTER, None),              # the transformer's mask, from all its blocks
    ("middle_block.1.transformer_blocks.7.ff.net.2", Role.AFTER, 7),
    ("input_blocks.4.1.transformer_blocks.1.attn2.to_out.0", Role.AFTER, 1),
    ("output_blocks.0.1.transformer_blocks.9.attn2.to_v", Role.TEXT, 9),
    ("input_blocks.7.1.transformer_blocks.3.attn1.to_q", Role.BEFORE, 3),
    ("input_blocks.7.1.transformer_blocks.3.attn2.to_q", Role.AFTER, 3),
    ("input_blocks.7.1.proj_in", Role.BEFORE, 0),
    ("input_blocks.1.0.in_layers.2", Role.SPATIAL, None),        # SDXL's first level has no transformer
    ("label_emb.0.0", Role.GLOBAL, None),                       # SDXL's ADM vector (pooled text, sizes)
])
def test_sdxl_layers_take_the_mask_of_their_own_block(path, role, block):
    where = placement(path, SDXL)
    assert where.role is role and where.block == block
    if where.slot is not None:
        assert where.site == (where.slot.index, block)


@pytest.mark.parametrize("family, path, role, site", [
    (ANIMA, "blocks.5.self_attn.q_proj", Role.BEFORE, (0, 5)),        # before the block's cross-attention
    (ANIMA, "blocks.5.self_attn.output_proj", Role.BEFORE, (0, 5)),
    (ANIMA, "blocks.5.cross_attn.q_proj", Role.AFTER, (0, 5)),        # the mask is made here
    (ANIMA, "blocks.5.cross_attn.k_proj", Role.TEXT, (0, 5)),         # acts on the text context
    (ANIMA, "blocks.5.cross_attn.v_proj", Role.TEXT, (0, 5)),
    (ANIMA, "blocks.5.cross_attn.output_proj", Role.AFTER, (0, 5)),
    (ANIMA, "blocks.27.mlp.layer2", Role.AFTER, (0, 27)),
    (ANIMA, "blocks.5.adaln_modulation_cross_attn.1", Role.GLOBAL, None),   # per-sample modulation
    (ANIMA, "llm_adapter.blocks.0.self_attn.q_proj", Role.GLOBAL, None),
    (ANIMA, "t_embedder.1.linear_1", Role.GLOBAL, None),
    (ANIMA, "x_embedder.proj.1", Role.SPATIAL, None),                 # patches: image locations
    (KREA2, "blocks.1.attn.wq", Role.AFTER, (0, 1)),                  # one joint attention: all after its map
    (KREA2, "blocks.1.attn.wk", Role.AFTER, (0, 1)),
    (KREA2, "blocks.1.attn.gate", Role.AFTER, (0, 1)),
    (KREA2, "blocks.1.mlp.down", Role.AFTER, (0, 1)),
    (KREA2, "txtfusion.refiner_blocks.0.attn.wq", Role.GLOBAL, None),  # the text-fusion blocks: text only
    (KREA2, "txtmlp.1", Role.GLOBAL, None),
    (KREA2, "tproj.1", Role.GLOBAL, None),
    (KREA2, "first", Role.SPATIAL, None),
])
def test_dit_layers_take_the_mask_of_their_block(family, path, role, site):
    where = placement(path, family)
    assert where.role is role
    if site is not None:
        assert where.site == site


def test_every_dit_block_has_one_text_attention_site():
    from perres_core.lag_layers import attention_sites, mask_sizes

    sites = attention_sites(KREA2, {"blocks": 2})
    assert [(s.site, s.path(KREA2), s.path(KREA2, "wq")) for s in sites] == [
        ((0, 0), "blocks.0.attn", "blocks.0.attn.wq"), ((0, 1), "blocks.1.attn", "blocks.1.attn.wq")]
    assert len(attention_sites(ANIMA)) == 28 and attention_sites(SD1)[0].path(SD1) == \
        "input_blocks.1.1.transformer_blocks.0.attn2"
    assert mask_sizes(ANIMA, 9, 8) == [(5, 4)]    # 2×2 patches, padded
    assert mask_sizes(SD1, 8, 8)[0] == (8, 8)


def test_add_into_is_the_masked_delta_added_in_place():
    g = torch.Generator().manual_seed(4)
    up, down = torch.randn(6, 3, generator=g), torch.randn(3, 5, generator=g)
    delta = LowRankDelta(up, down, scale=0.7)
    x, output = torch.randn(2, 4, 5, generator=g), torch.randn(2, 4, 6, generator=g)
    mask = (torch.rand(2, 4, 1, generator=g) > 0.5).float()
    expected = output + delta(x, mask=mask)
    assert delta.add_into(output, x, mask)
    torch.testing.assert_close(output, expected)
    conv = LowRankDelta(up, down, geometry=ConvGeometry())
    assert not conv.add_into(torch.zeros(1, 6, 2, 2), torch.zeros(1, 5, 2, 2))   # convs take the other path


def test_zero_padding_left_off_the_attention_counts_as_the_padded_columns():
    """A zero-padded context's zero keys and values (Anima pads to 512 tokens) can be left off LAG's own attention
    products and counted instead: the same output, the same concept map."""
    from perres_core.lag import concept_attention
    from perres_core.layer_delta import attention

    g = torch.Generator().manual_seed(2)
    q, k, v = torch.randn(2, 5, 8, generator=g), torch.randn(2, 3, 8, generator=g), torch.randn(2, 3, 8, generator=g)
    padded_k, padded_v = (torch.cat([t, torch.zeros(2, 4, 8)], dim=1) for t in (k, v))
    torch.testing.assert_close(attention(q, k, v, 2, padding=4), attention(q, padded_k, padded_v, 2))
    columns = torch.tensor([1, 2])
    torch.testing.assert_close(concept_attention(q, k, 2, columns, padding=4),
                               concept_attention(q, padded_k, 2, columns))
