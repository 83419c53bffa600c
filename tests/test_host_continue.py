"""Continuing a training run from saved residuals (PerRes Train Residuals' initial_residuals) in the real
ComfyUI host (random SD1.5 checkpoint, 64 px)."""
from __future__ import annotations

import logging
import os

import pytest
import torch

from conftest import pack, run_node
from host_helpers import held_out_loss, train, untrained_residuals

TRAIN = "PerRes Train Residuals"
FIRST = dict(steps=4, seed=4, learning_rate=3e-3, batch_size=4)


@pytest.fixture(scope="module")
def saved(sd15, concept_images, workdir):
    """(file path, name under models/loras, the residual loaded from it): a first run of 4 steps."""
    first = train(sd15, concept_images, **FIRST)[1]
    name = run_node("PerResSaveResiduals", residuals=first, filename_prefix="perres_continue/first")[0]
    loaded = run_node("PerResLoadResiduals", residual_name=name)[0]
    return os.path.join(workdir, "models", "loras", name), name, loaded


def snapshot(residuals) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    return {k: (layer.up.detach().clone(), layer.down.detach().clone()) for k, layer in residuals.layers.items()}


def test_continuation_starts_from_the_given_residual_and_leaves_it_and_its_file_alone(sd15, concept_images, saved,
                                                                                       monkeypatch):
    host = pack("nodes.host.training")
    path, _, loaded = saved
    before, data, mtime = snapshot(loaded), open(path, "rb").read(), os.stat(path).st_mtime_ns
    calls = []
    real = host.train_residuals

    def spy(predict, buckets, schedule, parameters, settings, *args, **kwargs):
        parameters = list(parameters)
        calls.append(([p.detach().cpu().clone() for p in parameters], settings))
        return real(predict, buckets, schedule, parameters, settings, *args, **kwargs)

    monkeypatch.setattr(host, "train_residuals", spy)
    _, continued, _ = train(sd15, concept_images, **{**FIRST, "steps": 2}, initial_residuals=loaded)
    (start, settings), = calls
    assert all(torch.equal(a, b) for a, b in zip(start, loaded.parameters())), "did not start from the residual"
    assert settings.start_step == 4, "the first run's random draws are not skipped"
    assert not all(torch.equal(a, b) for a, b in zip(continued.parameters(), loaded.parameters()))
    after = snapshot(loaded)
    assert all(torch.equal(before[k][0], after[k][0]) and torch.equal(before[k][1], after[k][1]) for k in before)
    assert not any(p.requires_grad for p in loaded.parameters())
    assert open(path, "rb").read() == data and os.stat(path).st_mtime_ns == mtime


def test_held_out_loss_keeps_falling_and_the_file_counts_all_steps(sd15, concept_images, saved, workdir):
    model, clip, vae = sd15
    _, _, loaded = saved
    continued = train(sd15, concept_images, **FIRST, initial_residuals=loaded)[1]
    untrained, first, second = (held_out_loss(model, clip, vae, concept_images, r)
                                for r in (untrained_residuals(FIRST["seed"]), loaded, continued))
    assert second < first < untrained, f"held-out ε-loss: {untrained:.5f} → {first:.5f} → {second:.5f}"

    name = run_node("PerResSaveResiduals", residuals=continued, filename_prefix="perres_continue/second")[0]
    metadata = pack("perres_core.residual_file").read_header(
        os.path.join(workdir, "models", "loras", name))["__metadata__"]
    assert metadata["perres.steps"] == "8" and metadata["perres.continued_from_steps"] == "4"
    assert metadata["perres.init"] == "continued"
    assert run_node("PerResLoadResiduals", residual_name=name)[0].training["steps"] == "8"


def test_other_ranks_are_refused_naming_the_layer(sd15, concept_images):
    residual = pack("perres_core.residual")
    other = residual.ResidualSet.create(pack("perres_core.families").SD1.layer_shapes(), 0.1,
                                        training={"steps": "3"})
    with pytest.raises(pack("perres_core.errors").PerResError) as info:
        train(sd15, concept_images, steps=1, initial_residuals=other)
    message = str(info.value)
    assert message.startswith(f"{TRAIN}: initial_residuals layer input_blocks.1.1.proj_out has rank 32, but "
                              "rank_ratio 0.05 gives rank 16. Set rank_ratio to the residual's 0.1"), message


def test_other_words_than_the_residuals_are_warned_about(sd15, concept_images, saved, caplog):
    _, _, loaded = saved
    with caplog.at_level(logging.WARNING, logger="perres"):
        continued = train(sd15, concept_images, steps=1, identifier="olis", class_word="cat",
                          initial_residuals=loaded)[1]
    assert any("initial_residuals were trained as 'sks dog'; this run trains 'olis cat'" in r.getMessage()
               for r in caplog.records), caplog.text
    assert continued.concept.caption() == "a photo of a olis cat"
