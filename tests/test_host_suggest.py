"""PerRes Suggest Class Word in the real host: a planted answer, determinism, shared trials, errors, Cancel."""
from __future__ import annotations

import logging

import pytest
import torch

import comfy.model_management
from conftest import pack, run_node

CANDIDATES = "dog, cat, robot, car, house, flower, teapot, person"
SUGGEST = dict(candidates=CANDIDATES, budget=8, seed=3, resolution=64)


def suggest(model, sd15, images, **overrides):
    _, clip, vae = sd15
    return run_node("PerResSuggestClassWord", model=model, clip=clip, vae=vae, images=images,
                    **{**SUGGEST, **overrides})


TOKEN_EMBEDDING = "clip_l.transformer.text_model.embeddings.token_embedding.weight"
PLANTED = "robot"


def single_token(clip, word: str) -> int:
    ids = [token for token, _ in clip.tokenize(word)["l"][0]]
    assert ids[2] == ids[-1], f"'{word}' is more than one token"  # start token, the word, end token, padding
    return ids[1]


def plant_word(sd15, images: torch.Tensor, word: str, steps: int = 10, lr: float = 5e-3):
    """A CLIP that has learned `word` from the images: its token embedding is trained, textual-inversion style,
    with the plain ε-loss on "a photo of a <word>" while the UNet and everything else stay frozen.

    The planted association lives where the suggester reads it, in the caption, so no other candidate's caption
    changes. Training through the UNet instead does not plant it on random weights: a k/v LoRA on every
    cross-attention, trained 40 steps on these images (with or without other images under the other words),
    lowered every caption's error alike and left `word` first by 0.6 standard errors at best.
    """
    model, clip, vae = sd15
    training, host = pack("perres_core.training"), pack("nodes.host.training")
    caption = pack("perres_core.class_words").caption_for(word)
    token = single_token(clip, word)
    embedding = clip.cond_stage_model.clip_l.transformer.text_model.embeddings.token_embedding
    delta = torch.zeros(embedding.weight.shape[1], requires_grad=True)

    def add_delta(module, args, output):
        return output + (args[0] == token).unsqueeze(-1) * delta.to(output.dtype)

    with torch.inference_mode():
        latents = vae.encode(pack("perres_core.images").prepare_batch(list(images), 64))
    patcher = pack("nodes.host.model").resident_clone(model)
    handle = embedding.register_forward_hook(add_delta)
    try:
        with torch.inference_mode(False), torch.enable_grad():
            comfy.model_management.load_models_gpu([patcher], force_full_load=True)
            unet = pack("nodes.host.model").unet_of(patcher)
            x0 = patcher.model.process_latent_in(latents.clone().float()).cpu()
            predict_noise = host.denoiser_prediction(patcher.model)
            tokens = clip.tokenize(caption)

            def predict_with_the_trained_word(x_t, t, _context):
                # the caption is encoded anew at every step, through the embedding being trained. ComfyUI's
                # CLIP layers add their residuals in place (x += ...), which autograd refuses for a tensor it
                # saved; saving copies makes the backward through CLIP valid.
                with torch.autograd.graph.saved_tensors_hooks(torch.clone, lambda saved: saved):
                    context = clip.cond_stage_model.encode_token_weights(tokens)[0].float()
                return predict_noise(x_t, t, pack("perres_core.diffusion").Conditioning(context.expand(len(t), -1, -1)))

            with host.frozen_for_backward(unet), host.frozen_for_backward(clip.cond_stage_model):
                # PerRes's own loop: the plain ε-loss, AdamW; the context argument is unused (see above)
                training.train_residuals(predict_with_the_trained_word,
                                         [training.LatentBucket(x0, torch.zeros(1, 1, 1))],
                                         pack("nodes.host.model").diffusion_schedule(patcher), [delta],
                                         training.TrainSettings(steps=steps, batch_size=4, learning_rate=lr))
    finally:
        handle.remove()
    planted = clip.clone()
    change = torch.zeros(embedding.weight.shape)
    change[token] = delta.detach()
    assert planted.add_patches({TOKEN_EMBEDDING: (change,)}) == [TOKEN_EMBEDDING]  # the host's weight patching
    return planted


def test_a_planted_word_ranks_first_and_the_untrained_model_has_no_clear_answer(sd15, concept_images, caplog):
    model, clip, vae = sd15
    candidates = pack("perres_core.class_words").DEFAULT_CANDIDATE_TEXT
    settings = dict(candidates=candidates, budget=8, seed=3)
    with caplog.at_level(logging.WARNING, logger="perres"):
        untrained_best, untrained_ranking = suggest(model, sd15, concept_images, **settings)
    # Untrained random weights know no words: the winner is arbitrary and the node says it is a close call.
    assert untrained_best != PLANTED
    assert "within two standard errors" in caplog.text
    caplog.clear()

    planted = plant_word(sd15, concept_images, PLANTED)
    with caplog.at_level(logging.WARNING, logger="perres"):
        best, ranking = run_node("PerResSuggestClassWord", model=model, clip=planted, vae=vae, images=concept_images,
                                 resolution=64, **settings)
    assert best == PLANTED, ranking
    assert "within two standard errors" not in caplog.text  # a clear winner
    assert untrained_ranking != ranking


def test_same_seed_same_ranking_and_every_word_sees_the_same_trials(sd15, concept_images, monkeypatch):
    training = pack("perres_core.training")
    class_words = pack("perres_core.class_words")
    seen = []
    original = training.epsilon_errors

    def spy(predict, x0, noise, t, conditioning, *args, **kwargs):
        seen.append((x0.clone(), noise.clone(), t.clone(), conditioning.context[:, 4:6].clone()))
        return original(predict, x0, noise, t, conditioning, *args, **kwargs)

    monkeypatch.setattr(class_words, "epsilon_errors", spy)
    first = suggest(sd15[0], sd15, concept_images, candidates="dog, cat, robot", budget=3)[1]
    calls = len(seen)
    assert suggest(sd15[0], sd15, concept_images, candidates="dog, cat, robot", budget=3)[1] == first
    trials: dict[bytes, set] = {}
    for x0, noise, t, words in seen[:calls]:
        for row in range(len(t)):
            key = (x0[row].numpy().tobytes(), int(t[row]), noise[row].numpy().tobytes())
            trials.setdefault(key, set()).add(words[row].numpy().tobytes())
    # 3 candidates, 4 images, 3 trials: every (image, t, noise) trial is scored once for each of the 3 words
    assert len(trials) == 4 * 3 and all(len(words) == 3 for words in trials.values())
    assert sum(len(t) for _, _, t, _ in seen[:calls]) == class_words.evaluation_count(3, 4, 3) == 36
    assert class_words.evaluation_count(49, 5, 12) == 5 * (49 * 3 + 5 * 9)  # the count in docs/class-word.md


def test_bad_inputs_are_clear_errors(sd15, concept_images):
    model = sd15[0]
    with pytest.raises(Exception, match="candidate list is empty"):
        suggest(model, sd15, concept_images, candidates=" ,\n ")
    with pytest.raises(Exception, match="listed twice"):
        suggest(model, sd15, concept_images, candidates="dog, Dog")
    with pytest.raises(Exception, match="is not a word"):
        suggest(model, sd15, concept_images, candidates="dog, (cat:1.2)")
    with pytest.raises(Exception, match="no reference images"):
        suggest(model, sd15, concept_images[:0])


def test_cancel_stops_the_ranking(sd15, concept_images, monkeypatch):
    import comfy.model_management

    calls = []

    def interrupt_on_second_check():
        calls.append(1)
        if len(calls) > 1:
            raise comfy.model_management.InterruptProcessingException()

    monkeypatch.setattr(comfy.model_management, "throw_exception_if_processing_interrupted", interrupt_on_second_check)
    with pytest.raises(comfy.model_management.InterruptProcessingException):
        suggest(sd15[0], sd15, concept_images, budget=4)
    assert len(calls) == 2
