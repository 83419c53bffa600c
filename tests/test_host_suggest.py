"""PerRes Suggest Class Word in the real host: determinism, shared trials, errors, Cancel."""
from __future__ import annotations

import pytest
import torch

from conftest import pack, run_node

CANDIDATES = "dog, cat, robot, car, house, flower, teapot, person"
SUGGEST = dict(candidates=CANDIDATES, budget=8, seed=3, resolution=64)


def suggest(model, sd15, images, **overrides):
    _, clip, vae = sd15
    return run_node("PerResSuggestClassWord", model=model, clip=clip, vae=vae, images=images,
                    **{**SUGGEST, **overrides})


def test_same_seed_same_ranking_and_every_word_sees_the_same_trials(sd15, concept_images, monkeypatch):
    training = pack("perres_core.training")
    class_words = pack("perres_core.class_words")
    seen = []
    original = training.epsilon_errors

    def spy(eps_fn, x0, noise, t, context, *args, **kwargs):
        seen.append((x0.clone(), noise.clone(), t.clone(), context[:, 4:6].clone()))
        return original(eps_fn, x0, noise, t, context, *args, **kwargs)

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
