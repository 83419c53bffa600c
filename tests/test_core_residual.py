"""perres_core on tiny tensors: residual math, initialisation, file format (no host needed)."""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from perres_core.errors import PerResError
from perres_core.residual import ConceptInfo, LowRankResidual, ResidualSet, rank_for
from perres_core.residual_file import is_residual_file, load_residual_file, read_header, save_residual_file
from perres_core.families import SD1


def test_sd15_parameter_count_matches_paper():
    """r_i = 0.05·m_i on the 16 proj_out layers gives exactly 1,239,040 parameters."""
    residuals = ResidualSet.create(SD1.layer_shapes())
    assert len(residuals.layers) == 16
    assert residuals.parameter_count() == SD1.residual_parameters == 1_239_040
    assert {layer.rank for layer in residuals.layers.values()} == {16, 32, 64}


@pytest.mark.parametrize("features, ratio, expected", [(320, 0.05, 16), (1280, 0.05, 64), (10, 0.05, 1), (8, 1.0, 8)])
def test_rank_for(features, ratio, expected):
    assert rank_for(features, ratio) == expected


@pytest.mark.parametrize("ratio", [0.0, -0.1, 1.5, float("nan")])
def test_rank_ratio_outside_range_is_refused(ratio):
    with pytest.raises(PerResError, match="rank_ratio"):
        rank_for(320, ratio)


def test_zero_init_gives_exactly_zero_delta_and_random_init_is_small_but_not_zero():
    layer = LowRankResidual(64, 64, 4)
    layer.initialize("zero", torch.Generator().manual_seed(0))
    assert torch.count_nonzero(layer.delta_weight()) == 0
    assert layer.down.abs().sum() > 0  # so gradients can reach A
    layer.initialize("random", torch.Generator().manual_seed(0))
    delta = layer.delta_weight()
    assert 0 < delta.abs().max() < 1e-2


@pytest.mark.parametrize("conv", [True, False])
def test_low_rank_forward_equals_full_delta_weight(conv):
    layer = LowRankResidual(32, 32, 4, conv=conv)
    layer.initialize("random", torch.Generator().manual_seed(3), std=0.3)
    if conv:
        x = torch.randn(2, 32, 5, 7)
        expected = F.conv2d(x, layer.delta_weight())
    else:
        x = torch.randn(2, 9, 32)
        expected = F.linear(x, layer.delta_weight())
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-6)


def _trained_like(seed: int = 0) -> ResidualSet:
    residuals = ResidualSet.create(SD1.layer_shapes(), concept=ConceptInfo("ktn", "cat"),
                                   training={"steps": 7, "seed": seed, "resolution": 512}, date="2024-05-20")
    residuals.initialize("random", seed)
    return residuals


def test_file_round_trip_keeps_tensors_words_and_metadata(tmp_path):
    residuals = _trained_like()
    path = save_residual_file(residuals, str(tmp_path / "cat.safetensors"), "test")
    loaded = load_residual_file(path)
    assert loaded.concept == ConceptInfo("ktn", "cat")
    assert loaded.training["steps"] == "7" and loaded.training["pack_version"] == "test"
    for key, layer in residuals.layers.items():
        torch.testing.assert_close(loaded.layers[key].delta_weight(), layer.delta_weight())


def test_file_uses_kohya_keys_with_alpha_equal_rank(tmp_path):
    path = save_residual_file(_trained_like(), str(tmp_path / "r.safetensors"), "test")
    tensors = load_file(path)
    assert len(tensors) == 3 * 16
    slot = SD1.slots[0]
    assert slot.kohya_prefix == "lora_unet_down_blocks_0_attentions_0_proj_out"
    assert tensors[slot.kohya_prefix + ".lora_up.weight"].shape == (320, 16, 1, 1)
    assert tensors[slot.kohya_prefix + ".lora_down.weight"].shape == (16, 320, 1, 1)
    assert float(tensors[slot.kohya_prefix + ".alpha"]) == 16.0


def test_saving_never_overwrites_and_leaves_no_temp_file(tmp_path):
    target = tmp_path / "r.safetensors"
    save_residual_file(_trained_like(0), str(target), "test")
    before = target.read_bytes()
    with pytest.raises(PerResError, match="already exists"):
        save_residual_file(_trained_like(1), str(target), "test")
    assert target.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["r.safetensors"]


def test_same_seed_same_file_bytes(tmp_path):
    a = save_residual_file(_trained_like(5), str(tmp_path / "a.safetensors"), "test")
    b = save_residual_file(_trained_like(5), str(tmp_path / "b.safetensors"), "test")
    assert open(a, "rb").read() == open(b, "rb").read()


def test_file_carries_modelspec_next_to_kohya_keys(tmp_path):
    """The fields A1111/Forge and model sites read, with the trigger words and the training run's date."""
    path = save_residual_file(_trained_like(), str(tmp_path / "cat.safetensors"), "test")
    metadata = read_header(path)["__metadata__"]
    assert {k: v for k, v in metadata.items() if k.startswith("modelspec.")} == {
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": "stable-diffusion-v1/lora",
        "modelspec.implementation": "diffusers",
        "modelspec.title": "ktn cat (PerRes residual)",
        "modelspec.trigger_phrase": "ktn cat",
        "modelspec.resolution": "512x512",
        "modelspec.date": "2024-05-20",
    }
    assert metadata["ss_network_module"] == "networks.lora" and metadata["ss_base_model_version"] == "sd_v1"


def test_resaving_a_loaded_file_keeps_its_training_date(tmp_path):
    first = save_residual_file(_trained_like(), str(tmp_path / "a.safetensors"), "test")
    loaded = load_residual_file(first)
    assert loaded.date == "2024-05-20"
    again = save_residual_file(loaded, str(tmp_path / "b.safetensors"), "test")
    assert read_header(again)["__metadata__"]["modelspec.date"] == "2024-05-20"


def test_new_residuals_are_dated_by_their_training_run():
    import datetime

    assert ResidualSet.create(SD1.layer_shapes()).date == datetime.date.today().isoformat()


def test_listing_reads_only_the_header(tmp_path):
    """A PerRes header is enough to be listed (the tensors are never read: here they are cut off); an
    ordinary LoRA, a non-safetensors file and garbage are not listed."""
    from safetensors.torch import save_file

    full = save_residual_file(_trained_like(), str(tmp_path / "full.safetensors"), "test")
    raw = open(full, "rb").read()
    header_end = 8 + int.from_bytes(raw[:8], "little")
    (tmp_path / "header_only.safetensors").write_bytes(raw[:header_end])
    save_file({"lora_unet_x.lora_up.weight": torch.zeros(4, 2)}, str(tmp_path / "lora.safetensors"),
              metadata={"ss_network_module": "networks.lora"})
    (tmp_path / "garbage.safetensors").write_bytes(b"\xff" * 64)
    (tmp_path / "residual.pt").write_bytes(raw)
    listed = {name for name in os.listdir(tmp_path) if is_residual_file(str(tmp_path / name))}
    assert listed == {"full.safetensors", "header_only.safetensors"}


def test_listing_cache_follows_changes_of_a_file(tmp_path):
    from safetensors.torch import save_file

    path = str(tmp_path / "r.safetensors")
    save_file({"x": torch.zeros(2)}, path)
    assert not is_residual_file(path)
    os.remove(path)
    save_residual_file(_trained_like(), path, "test")  # same path, new size and mtime
    assert is_residual_file(path)


@pytest.mark.parametrize("conv", [True, False])
def test_masked_low_rank_equals_mask_times_delta(conv):
    """M·(A·(B·x)) computed on the rank-r intermediate equals masking the full residual output."""
    from perres_core.residual import apply_low_rank

    layer = LowRankResidual(16, 16, 2, conv=conv)
    layer.initialize("random", torch.Generator().manual_seed(1), std=0.5)
    if conv:
        x, mask = torch.randn(2, 16, 3, 3), (torch.rand(2, 1, 3, 3) > 0.5).float()
    else:
        x, mask = torch.randn(2, 9, 16), (torch.rand(2, 9, 1) > 0.5).float()
    torch.testing.assert_close(apply_low_rank(x, layer.up, layer.down, conv, mask=mask), mask * layer(x))
