"""The model families (perres_core.families), the v-prediction target and SDXL residual files, host-free."""
from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

from perres_core.diffusion import Conditioning, Schedule
from perres_core.errors import PerResError
from perres_core.families import (FAMILIES, PAPER_RESIDUAL_SHARE, SD1, SDXL, a_model, family_named, family_of_config,
                                  family_of_kohya_prefixes, require_same_family)
from perres_core.residual import ConceptInfo, ResidualSet, check_continuable
from perres_core.residual_file import (load_residual_file, residuals_from_state_dict, residuals_metadata,
                                       residuals_to_state_dict, save_residual_file)


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_the_paper_rank_gives_the_stated_parameter_count(family):
    residuals = ResidualSet.for_family(family)
    assert residuals.parameter_count() == family.residual_parameters
    assert residuals.base_model == family.name
    assert all(layer.conv != family.linear_proj_out for layer in residuals.layers.values())


def test_sdxl_has_its_eleven_transformers_in_execution_order():
    assert [slot.path for slot in SDXL.slots] == [
        "input_blocks.4.1", "input_blocks.5.1", "input_blocks.7.1", "input_blocks.8.1", "middle_block.1",
        "output_blocks.0.1", "output_blocks.1.1", "output_blocks.2.1", "output_blocks.3.1", "output_blocks.4.1",
        "output_blocks.5.1"]
    assert [slot.channels for slot in SDXL.slots] == [640, 640, 1280, 1280, 1280, 1280, 1280, 1280, 640, 640, 640]
    assert [slot.depth for slot in SDXL.slots] == [2, 2, 10, 10, 10, 10, 10, 10, 2, 2, 2]
    assert SDXL.slots[0].diffusers == "down_blocks.1.attentions.0"
    assert SDXL.slots[7].diffusers == "up_blocks.0.attentions.2"
    # sd-scripts names SDXL layers by their original (LDM) paths, SD1.x layers by diffusers paths
    assert SDXL.slots[0].kohya_prefix == "lora_unet_input_blocks_4_1_proj_out"
    assert SD1.slots[0].kohya_prefix == "lora_unet_down_blocks_0_attentions_0_proj_out"


def test_a_family_is_chosen_from_the_detected_unet_config():
    sdxl_config = {"model_channels": 320, "use_linear_in_transformer": True, "context_dim": 2048,
                   "adm_in_channels": 2816, "transformer_depth": [0, 0, 2, 2, 10, 10], "in_channels": 4}
    assert family_of_config(sdxl_config) is SDXL
    assert family_of_config({**sdxl_config, "in_channels": 9}) is SDXL   # inpainting samples too
    assert family_of_config({**sdxl_config, "transformer_depth": [0, 0, 2, 2, 4, 4]}) is None  # SSD-1B: other layers
    sd2 = {"model_channels": 320, "use_linear_in_transformer": True, "context_dim": 1024, "adm_in_channels": None}
    assert family_of_config(sd2) is None
    assert family_of_kohya_prefixes({SD1.slots[0].kohya_prefix, SDXL.slots[0].kohya_prefix}) is None


def test_v_target_and_the_noise_it_implies():
    abar = torch.linspace(0.999, 0.001, 1000)
    x0, noise = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    t = torch.tensor([0, 500, 999])
    v = Schedule(abar, "v")
    x_t = v.noisy(x0, noise, t)
    a = abar[t].view(-1, 1, 1, 1)
    assert torch.allclose(v.target(x0, noise, t), a.sqrt() * noise - (1 - a).sqrt() * x0)
    # a perfect v̂ means a perfect ε̂
    assert torch.allclose(v.noise_from(v.target(x0, noise, t), x_t, t), noise, atol=1e-5)
    eps = Schedule(abar)
    assert torch.equal(eps.target(x0, noise, t), noise)
    with pytest.raises(PerResError, match="unknown prediction type"):
        Schedule(abar, "x0")


def test_conditioning_rows_keep_the_vector_with_its_caption():
    cond = Conditioning(torch.arange(6.0).view(3, 1, 2), torch.arange(3.0).view(3, 1))
    picked = cond.select(torch.tensor([2, 0]))
    assert picked.context[:, 0, 0].tolist() == [4.0, 0.0] and picked.vector[:, 0].tolist() == [2.0, 0.0]
    single = Conditioning(torch.ones(1, 1, 2), torch.ones(1, 5)).select(torch.tensor([0, 0, 0]))
    assert single.context.shape[0] == 3 and single.vector.shape == (3, 5)
    with pytest.raises(PerResError, match="vector"):
        Conditioning.cat([Conditioning(torch.ones(1, 1, 2)), Conditioning(torch.ones(1, 1, 2), torch.ones(1, 1))])


def _sdxl_residuals() -> ResidualSet:
    residuals = ResidualSet.for_family(SDXL, concept=ConceptInfo("ohwx", "woman"),
                                       training={"steps": "3", "resolution": "1024", "prediction": "v"})
    residuals.initialize("random", 1)
    return residuals


def test_an_sdxl_file_carries_kohya_sdxl_keys_linear_factors_and_sdxl_metadata(tmp_path):
    residuals = _sdxl_residuals()
    path = save_residual_file(residuals, str(tmp_path / "x.safetensors"), "test")
    with safe_open(path, framework="pt") as handle:
        keys, meta = set(handle.keys()), handle.metadata()
        up = handle.get_tensor("lora_unet_input_blocks_4_1_proj_out.lora_up.weight")
    assert len(keys) == 33 and up.shape == (640, 32)
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0"
    assert meta["modelspec.resolution"] == "1024x1024" and meta["perres.base_model"] == "SDXL"
    loaded = load_residual_file(path)
    assert loaded.base_model == "SDXL" and loaded.training["prediction"] == "v"
    for name, layer in residuals.layers.items():
        assert not loaded.layers[name].conv
        assert torch.allclose(loaded.layers[name].delta_weight(), layer.delta_weight().detach())


def test_a_file_whose_metadata_names_another_family_than_its_layers_is_refused():
    residuals = _sdxl_residuals()
    metadata = {**residuals_metadata(residuals, "test"), "perres.base_model": "SD1.x"}
    with pytest.raises(PerResError, match="holds SDXL layers"):
        residuals_from_state_dict(residuals_to_state_dict(residuals), metadata, "x")


def test_continuing_across_families_is_refused_naming_both():
    with pytest.raises(PerResError, match=r"trained on an SD1\.x model, but this model is SDXL"):
        check_continuable(ResidualSet.for_family(SD1), ResidualSet.for_family(SDXL))


# --- the diffusion transformers (issue 29) --------------------------------------------------------------------

def test_dit_families_put_the_residual_on_every_block_output_layer_at_the_papers_share():
    anima, krea2 = family_named("Anima"), family_named("Krea 2")
    assert [layer.path for layer in anima.layers[:3]] == ["blocks.0.self_attn.output_proj",
                                                         "blocks.0.cross_attn.output_proj", "blocks.0.mlp.layer2"]
    assert [layer.path for layer in krea2.layers[:2]] == ["blocks.0.attn.wo", "blocks.0.mlp.down"]
    assert len(anima.layers) == 84 and len(krea2.layers) == 56
    assert krea2.layer_by_path["blocks.27.mlp.down"].lora_name == "lora_unet_blocks_27_mlp_down"
    for family, rank in ((anima, 6), (krea2, 19)):
        assert {family.rank(layer) for layer in family.layers} == {rank}
        share = family.residual_parameters / family.denoiser_parameters
        # within 3 % of the paper's share of SD1.5 (1,239,040 of 859,520,964: 0.144 %)
        assert share == pytest.approx(PAPER_RESIDUAL_SHARE, rel=0.03), share
        # rank_ratio keeps its meaning: twice the ratio, twice the residual; the paper's rule would be 17–18× larger
        assert ResidualSet.for_family(family, 0.1).parameter_count() == 2 * family.residual_parameters
        paper_rule = sum(round(0.05 * layer.out_features) * (layer.out_features + layer.in_features)
                         for layer in family.layers)
        assert paper_rule > 15 * family.residual_parameters


def test_a_dit_with_fewer_blocks_keeps_the_released_rank_and_its_file_loads(tmp_path):
    krea2 = family_named("Krea 2")
    residuals = ResidualSet.for_family(krea2, unet_config={"layers": 2}, concept=ConceptInfo("ohwx", "woman"))
    residuals.initialize("random", 3)
    assert sorted(residuals.layers) == ["blocks.0.attn.wo", "blocks.0.mlp.down", "blocks.1.attn.wo",
                                        "blocks.1.mlp.down"]
    assert {layer.rank for layer in residuals.layers.values()} == {19}
    path = save_residual_file(residuals, str(tmp_path / "k.safetensors"), "test")
    with safe_open(path, framework="pt") as handle:
        meta = handle.metadata()
        assert handle.get_tensor("lora_unet_blocks_1_mlp_down.lora_down.weight").shape == (19, 16384)
    assert meta["modelspec.architecture"] == "krea-2/lora" and meta["ss_base_model_version"] == "krea2"
    assert meta["perres.base_model"] == "Krea 2" and meta["modelspec.resolution"] == "1024x1024"
    loaded = load_residual_file(path)
    assert loaded.base_model == "Krea 2" and sorted(loaded.layers) == sorted(residuals.layers)
    for name, layer in residuals.layers.items():
        assert torch.equal(loaded.layers[name].delta_weight(), layer.delta_weight().detach())


@pytest.mark.parametrize("trained_on", FAMILIES, ids=lambda f: f.name)
@pytest.mark.parametrize("used_on", FAMILIES, ids=lambda f: f.name)
def test_a_residual_of_one_family_is_refused_on_every_other_naming_both(trained_on, used_on):
    if trained_on is used_on:
        require_same_family(trained_on.name, used_on)
        return
    with pytest.raises(PerResError) as refused:
        require_same_family(trained_on.name, used_on)
    message = str(refused.value)
    assert f"was trained on {a_model(trained_on.name)}, but this model is {used_on.name}" in message
    assert f"Load {a_model(trained_on.name, 'checkpoint')}" in message


def test_the_families_are_told_apart_by_what_the_host_detects():
    assert family_of_config({"image_model": "anima", "model_channels": 2048, "num_blocks": 28}).name == "Anima"
    assert family_of_config({"image_model": "krea2", "features": 6144, "layers": 2}).name == "Krea 2"
    assert family_of_config({"image_model": "cosmos_predict2", "model_channels": 2048}) is None  # Cosmos, no adapter
    assert family_of_kohya_prefixes({"lora_unet_blocks_0_attn_wo", "lora_unet_blocks_0_mlp_down"}).name == "Krea 2"
    assert family_of_kohya_prefixes({"lora_unet_blocks_0_attn_wo", "lora_unet_blocks_0_mlp_layer2"}) is None


def test_the_flow_schedule_noises_targets_and_denoises_as_comfyui_const_sampling():
    sigmas = torch.linspace(0.001, 1.0, 1000)
    flow = Schedule(sigmas, "flow")
    x0, noise = torch.randn(3, 16, 2, 2), torch.randn(3, 16, 2, 2)
    t = torch.tensor([0, 500, 999])
    s = sigmas[t].view(-1, 1, 1, 1)
    x_t = flow.noisy(x0, noise, t)
    assert torch.allclose(x_t, (1 - s) * x0 + s * noise)   # CONST.noise_scaling
    velocity = flow.target(x0, noise, t)
    assert torch.equal(velocity, noise - x0)
    assert torch.allclose(flow.denoised(velocity, x_t, t), x0, atol=1e-5)   # CONST.calculate_denoised
    assert torch.allclose(flow.noise_from(velocity, x_t, t), noise, atol=1e-5)
    with pytest.raises(PerResError, match="noise levels"):
        flow.alphas_cumprod


def test_conditioning_extras_travel_with_their_rows():
    cond = Conditioning(torch.zeros(2, 3, 4), None, {"t5xxl_ids": torch.tensor([[1, 2], [3, 4]])})
    picked = cond.select(torch.tensor([1, 1, 0]))
    assert picked.extras["t5xxl_ids"].tolist() == [[3, 4], [3, 4], [1, 2]]
    moved = cond.to("cpu", torch.bfloat16)
    assert moved.context.dtype == torch.bfloat16 and moved.extras["t5xxl_ids"].dtype == torch.int64
    assert cond.model_inputs() == {"t5xxl_ids": cond.extras["t5xxl_ids"]}
    with pytest.raises(PerResError, match="1 t5xxl_ids for 2 captions"):
        Conditioning(torch.zeros(2, 3, 4), None, {"t5xxl_ids": torch.zeros(1, 2)})
