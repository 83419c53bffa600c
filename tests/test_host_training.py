"""Training, saving, loading and applying residuals in the real ComfyUI host (random SD1.5 checkpoint)."""
from __future__ import annotations

import logging
import os

import pytest
import torch

from conftest import node_ui, pack, run_node
from host_helpers import denoise, encode, held_out_loss, proj_out_patch_keys, train, untrained_residuals

SD15_PROJ_OUT_KEYS = {f"diffusion_model.{slot.proj_out}.weight" for slot in pack("perres_core.families").SD1.slots}


@pytest.fixture(scope="module")
def trained(sd15, concept_images):
    model, _, _ = sd15
    uuid_before, patches_before = model.patches_uuid, dict(model.patches)
    result = train(sd15, concept_images, steps=2, batch_size=4)
    assert model.patches_uuid == uuid_before and model.patches == patches_before, "input MODEL was mutated"
    return result


@pytest.mark.every_host  # the smallest SD1.x training run, through each host's loaders and key map
def test_train_node_outputs_residuals_loss_map_and_patched_model(trained):
    model, residuals, loss_map = trained
    assert residuals.parameter_count() == 1_239_040
    assert len(loss_map["loss"]) == 2 and all(torch.isfinite(torch.tensor(loss_map["loss"])))
    assert proj_out_patch_keys(model) == SD15_PROJ_OUT_KEYS
    assert residuals.concept.caption() == "a photo of a sks dog"
    assert not any(p.requires_grad for p in residuals.parameters())


@pytest.mark.every_host  # the smallest SD1.x training run, through each host's loaders and key map
def test_stock_loss_graph_plots_the_loss_map(trained):
    import folder_paths

    # The images the node shows; where it writes them and how it names them differ between ComfyUI versions.
    images = node_ui("LossGraphNode", loss=trained[2], filename_prefix="perres_loss").get("images")
    assert images, "Plot Loss Graph shows no image"
    for image in images:
        path = os.path.join(folder_paths.get_directory_by_type(image["type"]), image["subfolder"], image["filename"])
        assert os.path.isfile(path) and os.path.getsize(path) > 0, path


@pytest.mark.every_host  # the smallest SD1.x training run, through each host's loaders and key map
def test_saved_file_is_listed_for_stock_loaders_and_never_overwritten(trained, workdir):
    import folder_paths

    first = run_node("PerResSaveResiduals", residuals=trained[1], filename_prefix="perres/train_test")[0]
    second = run_node("PerResSaveResiduals", residuals=trained[1], filename_prefix="perres/train_test")[0]
    assert first == "perres/train_test_00001.safetensors" and second == "perres/train_test_00002.safetensors"
    assert first in folder_paths.get_filename_list("loras")
    loaded = run_node("PerResLoadResiduals", residual_name=first)[0]
    for key, layer in trained[1].layers.items():
        torch.testing.assert_close(loaded.layers[key].delta_weight(), layer.delta_weight())


@pytest.mark.every_host  # the smallest SD1.x training run, through each host's loaders and key map
def test_stock_lora_loader_matches_apply_node(trained, sd15, caplog):
    """LoraLoaderModelOnly on the saved file and PerRes Apply give the same denoiser output.

    Both merge W + ΔW through ComfyUI's weight adapter in fp32; the tolerance is fp32 rounding (1e-5).
    """
    model, clip, _ = sd15
    name = run_node("PerResSaveResiduals", residuals=trained[1], filename_prefix="perres/parity")[0]
    with caplog.at_level(logging.WARNING):
        stock = run_node("LoraLoaderModelOnly", model=model, lora_name=name, strength_model=1.0)[0]
    assert "lora key not loaded" not in caplog.text
    ours = run_node("PerResApplyResiduals", model=model, residuals=trained[1], strength=1.0)[0]
    assert proj_out_patch_keys(stock) == proj_out_patch_keys(ours) == SD15_PROJ_OUT_KEYS

    generator = torch.Generator().manual_seed(3)
    x = torch.randn(1, 4, 8, 8, generator=generator) * 3.0
    context = encode(clip, "a photo of a sks dog")[0][0]
    base_out = denoise(model, x, 3.0, context)
    stock_out = denoise(stock, x, 3.0, context)
    ours_out = denoise(ours, x, 3.0, context)
    torch.testing.assert_close(ours_out, stock_out, rtol=1e-5, atol=1e-5)
    assert (ours_out - base_out).abs().max() > 1e-4, "the residual changed nothing"
    zero = run_node("PerResApplyResiduals", model=model, residuals=trained[1], strength=0.0)[0]
    assert torch.equal(denoise(zero, x, 3.0, context), base_out)


def test_same_seed_gives_the_same_residual_file(sd15, concept_images, workdir, monkeypatch):
    """Determinism on the CPU: two runs with one seed save byte-identical files.

    The file records the day of its training run (modelspec.date); a fixed clock keeps two runs that
    straddle midnight identical too."""
    monkeypatch.setattr(pack("perres_core.residual"), "training_date", lambda: "2024-05-20")
    names = []
    for _ in range(2):
        residuals = train(sd15, concept_images, steps=1, seed=11)[1]
        names.append(run_node("PerResSaveResiduals", residuals=residuals, filename_prefix="perres/determinism")[0])
    root = os.path.join(workdir, "models", "loras")
    a, b = (open(os.path.join(root, n), "rb").read() for n in names)
    assert names[0] != names[1] and a == b


def test_saved_file_names_its_trigger_words_and_training_day(sd15, concept_images, workdir, monkeypatch):
    """modelspec fields that A1111/Forge read; the date is the training run's, not the save's."""
    residual = pack("perres_core.residual")
    monkeypatch.setattr(residual, "training_date", lambda: "2024-05-20")
    residuals = train(sd15, concept_images, steps=1, identifier="olis", class_word="cat")[1]
    monkeypatch.setattr(residual, "training_date", lambda: "2099-01-01")
    name = run_node("PerResSaveResiduals", residuals=residuals, filename_prefix="perres/modelspec")[0]
    path = os.path.join(workdir, "models", "loras", name)
    metadata = pack("perres_core.residual_file").read_header(path)["__metadata__"]
    assert metadata["modelspec.trigger_phrase"] == "olis cat"
    assert metadata["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert metadata["modelspec.resolution"] == "64x64"
    assert metadata["modelspec.date"] == "2024-05-20"
    assert metadata["perres.identifier"] == "olis"


def test_training_lowers_held_out_epsilon_loss(sd15, concept_images):
    """ε-MSE on the training images at fixed timesteps and noise that training never drew drops below the
    untrained residual's: this fails if no gradient reaches the residual."""
    model, clip, vae = sd15
    steps, seed, lr = 8, 4, 3e-3
    trained = train(sd15, concept_images, steps=steps, seed=seed, learning_rate=lr, batch_size=4)[1]
    before = held_out_loss(model, clip, vae, concept_images, untrained_residuals(seed))
    after = held_out_loss(model, clip, vae, concept_images, trained)
    assert after < before * 0.995, f"held-out ε-loss did not drop: {before:.5f} → {after:.5f}"


def test_frozen_for_backward_handles_inference_tensors_and_restores_flags():
    host = pack("nodes.host.training")
    with torch.inference_mode():
        conv = torch.nn.Conv2d(4, 4, 1)
    assert conv.weight.is_inference()
    extra = torch.nn.Parameter(torch.ones(4, 4, 1, 1))
    with torch.inference_mode(False), host.frozen_for_backward(conv):
        assert not conv.weight.requires_grad and not conv.weight.is_inference()
        out = torch.nn.functional.conv2d(torch.randn(1, 4, 3, 3), conv.weight + extra)
        out.sum().backward()
    assert extra.grad is not None and conv.weight.grad is None
    assert conv.weight.requires_grad and conv.bias.requires_grad
