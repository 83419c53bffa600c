"""PerRes on SDXL in the real host: detection, training (ε and v-prediction), files the SDXL ecosystem reads,
Apply against the stock LoraLoaderModelOnly, family refusals both ways, continuing, and the suggester.

The model is the random SDXL-architecture checkpoint (tests/sdxl_checkpoint.py) from the stock
CheckpointLoaderSimple with its UNet in bf16; everything runs at 64 px so that a training step stays a
few seconds on the CPU. v-prediction with zero-terminal SNR is set by the stock ModelSamplingDiscrete
node, as users do for NoobAI-style checkpoints.
"""
from __future__ import annotations

import logging
import os

import pytest
import torch

from conftest import node_ui, pack, run_node
from host_helpers import encode, factors, layers_equal, untrained_residuals

pytestmark = [pytest.mark.sdxl, pytest.mark.slow]

TRAIN = dict(identifier="sks", class_word="dog", steps=2, batch_size=2, learning_rate=1e-3, rank_ratio=0.05,
             resolution=64, seed=0, init="random")


def families():
    return pack("perres_core.families")


def train_sdxl(sdxl, images, model=None, **overrides):
    """(model, residuals, loss_map) from PerRes Train Residuals on the SDXL model at 64 px."""
    base, clip, vae = sdxl
    return run_node("PerResTrainResiduals", model=model or base, clip=clip, vae=vae, images=images,
                    **{**TRAIN, **overrides})


def sdxl_conditioning(model, clip, caption: str, size: int = 64):
    return pack("nodes.host.training").caption_conditioning(model, clip, caption, size, size)


def held_out_loss(model, clip, vae, images: torch.Tensor, residuals) -> float:
    """The training loss (ε or v target, as the model predicts) of `model` with `residuals` at fixed timesteps
    and noise that training never draws."""
    training, hooks, host = pack("perres_core.training"), pack("nodes.host.residual_hooks"), pack("nodes.host.training")
    with torch.inference_mode():
        latents = model.model.process_latent_in(vae.encode(images)).clone().float()
    conditioning = sdxl_conditioning(model, clip, "a photo of a sks dog")
    unet = model.model.diffusion_model
    with torch.no_grad(), hooks.residual_hooks(unet, residuals.layers):
        return training.evaluation_loss(host.denoiser_prediction(model.model), latents, conditioning,
                                        pack("nodes.host.model").diffusion_schedule(model),
                                        torch.tensor([150, 450, 750]), seed=12345,
                                        dtype=host.training_dtype(model.model))


def untrained_sdxl(seed: int):
    residuals = pack("perres_core.residual").ResidualSet.for_family(families().SDXL)
    with torch.inference_mode(False):
        residuals.initialize("random", seed)
    return residuals


def denoise(model, x: torch.Tensor, sigma: float, conditioning) -> torch.Tensor:
    """The patched SDXL model's denoised prediction through ComfyUI's apply_model (with the ADM vector y)."""
    import comfy.model_management

    with torch.inference_mode():
        comfy.model_management.load_models_gpu([model], force_full_load=True)
        sigmas = torch.full((x.shape[0],), sigma)
        return model.model.apply_model(x, sigmas, c_crossattn=conditioning.context,
                                       y=conditioning.vector).float().cpu()


def test_sdxl_is_detected_with_its_eleven_linear_proj_out_layers(sdxl):
    model = sdxl[0]
    host = pack("nodes.host.model")
    assert host.config_name(model) == "SDXL"
    family = host.family_of_model(model)
    assert family is families().SDXL and len(family.slots) == 11
    unet = model.model.diffusion_model
    assert all(isinstance(unet.get_submodule(s.proj_out), torch.nn.Linear) for s in family.slots)
    assert untrained_sdxl(0).parameter_count() == 1_187_840
    assert host.diffusion_schedule(model).prediction == "epsilon"
    assert model.model.get_dtype() == torch.bfloat16
    assert pack("nodes.host.training").training_dtype(model.model) == torch.bfloat16


def test_the_adm_vector_is_the_one_the_host_samples_with(sdxl):
    """The training conditioning's y is what SDXL's own extra_conds builds for sampling at that size."""
    model, clip, _ = sdxl
    conditioning = sdxl_conditioning(model, clip, "a photo of a sks dog", 64)
    assert conditioning.context.shape == (1, 77, 2048) and conditioning.vector.shape == (1, 2816)
    positive = encode(clip, "a photo of a sks dog")
    sampled = model.model.extra_conds(**positive[0][1], width=64, height=64, device=torch.device("cpu"),
                                      noise=torch.zeros(1, 4, 8, 8))["y"].cond
    torch.testing.assert_close(conditioning.vector, sampled.float())
    other = sdxl_conditioning(model, clip, "a photo of a sks dog", 128)
    assert not torch.equal(other.vector, conditioning.vector), "the size embedding is missing"


def test_gradient_checkpointing_gives_the_same_sdxl_residual(sdxl, concept_images):
    results = {flag: train_sdxl(sdxl, concept_images, seed=5, learning_rate=1e-2, gradient_checkpointing=flag)
               for flag in (False, True)}
    assert results[False][2]["loss"] == pytest.approx(results[True][2]["loss"], rel=1e-5)
    plain, checkpointed, start = factors(results[False][1]), factors(results[True][1]), factors(untrained_sdxl(5))
    for key in plain:
        torch.testing.assert_close(checkpointed[key], plain[key], rtol=1e-5, atol=1e-6)
    assert any(not torch.equal(plain[key], start[key]) for key in plain), "training changed nothing"
    assert results[True][1].base_model == "SDXL"


@pytest.mark.parametrize("prediction", ["epsilon", "v"])
def test_training_lowers_the_held_out_loss_in_each_prediction_type(sdxl, concept_images, prediction):
    base, clip, vae = sdxl
    model = base if prediction == "epsilon" else \
        run_node("ModelSamplingDiscrete", model=base, sampling="v_prediction", zsnr=True)[0]
    assert pack("nodes.host.model").diffusion_schedule(model).prediction == prediction
    steps, seed, lr = 8, 4, 3e-3
    trained = train_sdxl(sdxl, concept_images, model=model, steps=steps, seed=seed, learning_rate=lr,
                         batch_size=4)[1]
    assert trained.training["prediction"] == prediction
    before = held_out_loss(model, clip, vae, concept_images, untrained_sdxl(seed))
    after = held_out_loss(model, clip, vae, concept_images, trained)
    assert after < before * 0.995, f"held-out {prediction} loss did not drop: {before:.5f} → {after:.5f}"


def test_same_seed_same_bytes_with_kohya_sdxl_keys_and_metadata(sdxl, concept_images, workdir, monkeypatch):
    monkeypatch.setattr(pack("perres_core.residual"), "training_date", lambda: "2026-12-01")
    names = []
    for _ in range(2):
        residuals = train_sdxl(sdxl, concept_images, steps=1, seed=11)[1]
        names.append(run_node("PerResSaveResiduals", residuals=residuals, filename_prefix="perres/sdxl_same")[0])
    root = os.path.join(workdir, "models", "loras")
    a, b = (open(os.path.join(root, n), "rb").read() for n in names)
    assert names[0] != names[1] and a == b
    header = pack("perres_core.residual_file").read_header(os.path.join(root, names[0]))
    metadata = header.pop("__metadata__")
    assert metadata["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert metadata["ss_base_model_version"] == "sdxl_base_v1-0"
    assert metadata["perres.base_model"] == "SDXL"
    assert {key.rsplit(".lora_", 1)[0].removesuffix(".alpha") for key in header} == \
        {slot.kohya_prefix for slot in families().SDXL.slots}
    assert header["lora_unet_middle_block_1_proj_out.lora_up.weight"]["shape"] == [1280, 64]


def test_masks_of_ones_are_bit_identical_to_no_masks_on_sdxl(sdxl, concept_images):
    plain = train_sdxl(sdxl, concept_images, steps=1, seed=6)[1]
    ones = train_sdxl(sdxl, concept_images, steps=1, seed=6, masks=torch.ones(4, 64, 64), background_weight=0.0)[1]
    assert layers_equal(plain, ones)


def test_stock_lora_loader_matches_apply_on_sdxl_and_the_load_node_names_the_family(sdxl, concept_images, caplog):
    model, clip, _ = sdxl
    trained = train_sdxl(sdxl, concept_images, steps=1, seed=2, learning_rate=1e-2)[1]
    name = run_node("PerResSaveResiduals", residuals=trained, filename_prefix="perres/sdxl_parity")[0]
    with caplog.at_level(logging.WARNING):
        stock = run_node("LoraLoaderModelOnly", model=model, lora_name=name, strength_model=1.0)[0]
    assert "lora key not loaded" not in caplog.text
    ours = run_node("PerResApplyResiduals", model=model, residuals=trained, strength=1.0)[0]
    expected = {f"diffusion_model.{slot.proj_out}.weight" for slot in families().SDXL.slots}
    assert {k for k in stock.patches if k.endswith(".weight")} == {k for k in ours.patches if k.endswith(".weight")} \
        == expected
    conditioning = sdxl_conditioning(model, clip, "a photo of a sks dog")
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3)) * 3.0
    base_out, stock_out, ours_out = (denoise(m, x, 3.0, conditioning) for m in (model, stock, ours))
    torch.testing.assert_close(ours_out, stock_out, rtol=0, atol=0)   # one merge, by the same host code
    assert (ours_out - base_out).abs().max() > 1e-3, "the residual changed nothing"
    shown = node_ui("PerResLoadResiduals", residual_name=name)["text"][0]
    assert shown.startswith("SDXL residual 'sks dog'") and "use it on SDXL models" in shown


def test_a_residual_of_one_family_is_refused_on_the_other_naming_both(sdxl, sd15, concept_images):
    error = pack("perres_core.errors").PerResError
    sd1_residual, sdxl_residual = untrained_residuals(0), untrained_sdxl(0)
    with pytest.raises(error, match=r"trained on an SD1\.x model, but this model is SDXL"):
        run_node("PerResApplyResiduals", model=sdxl[0], residuals=sd1_residual, strength=1.0)
    with pytest.raises(error, match=r"trained on an SDXL model, but this model is SD1\.x"):
        run_node("PerResApplyResiduals", model=sd15[0], residuals=sdxl_residual, strength=1.0)
    with pytest.raises(error, match=r"trained on an SDXL model, but this model is SD1\.x"):
        run_node("PerResLAGSampling", model=sd15[0], clip=sd15[1], residuals=sdxl_residual,
                 prompt="a photo of a sks dog", concept_words="", strength=1.0, threshold="median", quantile=0.5,
                 start_percent=0.0, end_percent=1.0, outside_window="full residual")
    with pytest.raises(error, match=r"initial_residuals was trained on an SD1\.x model, but this model is SDXL"):
        train_sdxl(sdxl, concept_images, steps=1, initial_residuals=sd1_residual)


def test_continuing_an_sdxl_run_counts_all_steps(sdxl, concept_images):
    first = train_sdxl(sdxl, concept_images, steps=1, seed=3)[1]
    continued = train_sdxl(sdxl, concept_images, steps=1, seed=3, initial_residuals=first)[1]
    assert continued.training["steps"] == 2 and continued.training["continued_from_steps"] == 1
    assert continued.base_model == "SDXL" and not layers_equal(first, continued)


def test_the_low_resolution_warning_and_the_family_default(sdxl, concept_images, caplog):
    with caplog.at_level(logging.WARNING, logger="perres"):
        trained = train_sdxl(sdxl, concept_images, steps=1)[1]
    assert "training SDXL at 64 px; SDXL models are trained at 1024 px" in caplog.text
    assert trained.training["resolution"] == 64
    node = pack("nodes.train_node")
    assert node.training_resolution(0, families().SDXL, node.NodeWarnings("x", None)) == 1024


def test_the_suggester_scores_sdxl_captions_with_their_own_vectors(sdxl, concept_images, monkeypatch):
    class_words = pack("perres_core.class_words")
    seen = []
    real = class_words.epsilon_errors

    def spy(predict, x0, noise, t, conditioning, *args, **kwargs):
        seen.append(conditioning)
        return real(predict, x0, noise, t, conditioning, *args, **kwargs)

    monkeypatch.setattr(class_words, "epsilon_errors", spy)
    model, clip, vae = sdxl
    best, ranking = run_node("PerResSuggestClassWord", model=model, clip=clip, vae=vae, images=concept_images[:2],
                             candidates="dog, robot", budget=4, seed=0, resolution=64)
    assert best in ("dog", "robot") and "robot" in ranking and "dog" in ranking
    vectors = torch.cat([c.vector for c in seen])
    assert vectors.shape[1] == 2816
    assert not torch.equal(vectors.min(dim=0).values, vectors.max(dim=0).values), "one vector for every word"


def test_out_of_memory_on_sdxl_says_what_to_change_and_leaves_the_model_clean(sdxl, concept_images):
    model = sdxl[0]
    unet = model.model.diffusion_model
    patches_before = dict(model.patches)

    def fail(module, args, output):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 4.00 GiB")

    handle = unet.output_blocks[2][1].register_forward_hook(fail)  # the last 1280-channel transformer
    try:
        with pytest.raises(pack("perres_core.errors").PerResError) as info:
            train_sdxl(sdxl, concept_images, steps=2, batch_size=4)
    finally:
        handle.remove()
    message = str(info.value)
    assert message.startswith("PerRes Train Residuals: out of memory") and "e.g. 896 or 768" in message
    assert "Nothing was saved" in message and "batch_size 4" in message
    assert all(not unet.get_submodule(s.proj_out)._forward_hooks for s in families().SDXL.slots)
    assert model.patches == patches_before


def test_buckets_previews_and_snapshots_on_sdxl(sdxl, monkeypatch, workdir):
    """SDXL's size embedding follows each bucket, the preview decodes SDXL latents with SDXL's own
    latent-to-RGB factors, and the snapshots are SDXL residual files."""
    import comfy.utils
    from comfy.cli_args import LatentPreviewMethod, args

    train_node = pack("nodes.train_node")
    sizes, previews = [], []
    conditioning = train_node.caption_conditioning

    def recorded(model, clip, caption, width, height):
        sizes.append((width, height))
        return conditioning(model, clip, caption, width, height)
    monkeypatch.setattr(train_node, "caption_conditioning", recorded)
    monkeypatch.setattr(args, "preview_method", LatentPreviewMethod.Latent2RGB)
    monkeypatch.setattr(comfy.utils, "PROGRESS_BAR_HOOK", lambda value, total, preview, node_id=None:
                        previews.append(preview))
    generator = torch.Generator().manual_seed(3)
    portrait, square = torch.rand(1, 192, 64, 3, generator=generator), torch.rand(1, 128, 128, 3, generator=generator)
    _, final, loss, snapshots = train_sdxl(sdxl, [portrait, square], resolution=128, crop="buckets", steps=2,
                                           batch_size=1, preview_every=1, snapshot_every=1,
                                           snapshot_prefix="sdxl_watch/snap", gradient_checkpointing=False)
    assert sizes == [(64, 192), (128, 128)]  # (width, height) of each bucket
    assert final.training["buckets"] == "1 × 64×192, 1 × 128×128"
    assert len(previews) == 2 and all(p is not None for p in previews)
    assert previews[0][1].size == (8, 24)  # the first reference image, a 64×192 portrait, as latent cells
    assert [s.training["steps"] for s in snapshots] == [1, 2]
    folder = os.path.join(workdir, "models", "loras", "sdxl_watch")
    residual_file = pack("perres_core.residual_file")
    saved = residual_file.load_residual_file(os.path.join(folder, "snap_step00001_00001.safetensors"))
    assert saved.base_model == "SDXL" and len(saved.layers) == 11
