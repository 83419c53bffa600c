"""Training runs on a model that stays fully on the device (no dynamic VRAM streaming), on every host.

Current ComfyUI loads models through ModelPatcherDynamic on NVIDIA GPUs; backpropagating through streamed
weights can read reused buffers. On the CPU the host never makes a dynamic patcher, so these tests let a
real patcher report is_dynamic() and spy on what the pack asks of it.
"""
from __future__ import annotations

import inspect

import pytest

from conftest import pack
from host_helpers import train

pytestmark = pytest.mark.every_host  # dynamic VRAM exists on some hosts only


def host_has_dynamic_vram() -> bool:
    try:
        import comfy.model_patcher
    except ImportError:  # no host: the fixtures skip these tests
        return False
    return "disable_dynamic" in inspect.signature(comfy.model_patcher.ModelPatcher.clone).parameters


@pytest.fixture
def loaded_for_training(monkeypatch):
    """The patchers that training hands to the host's load_models_gpu."""
    import comfy.model_management

    loaded = []
    load_models_gpu = comfy.model_management.load_models_gpu

    def spy(models, *args, **kwargs):
        loaded.extend(models)
        return load_models_gpu(models, *args, **kwargs)

    monkeypatch.setattr(comfy.model_management, "load_models_gpu", spy)
    return loaded


def as_dynamic(model, monkeypatch) -> list[tuple[dict, object]]:
    """Make a clone of `model` report dynamic loading; returns (keyword arguments, result) of its clone() calls.

    clone(disable_dynamic=True) would reload the 2 GB checkpoint through the loader; the spy hands out a
    plain (resident, non-dynamic) clone instead, which is what the host returns too.
    """
    calls: list[tuple[dict, object]] = []
    plain_clone = model.clone

    def clone(*args, **kwargs):
        calls.append((kwargs, plain_clone()))
        return calls[-1][1]

    monkeypatch.setattr(model, "is_dynamic", lambda: True, raising=False)
    monkeypatch.setattr(model, "clone", clone)
    return calls


def test_training_loads_the_resident_clone(sd15, concept_images, loaded_for_training, monkeypatch):
    host_model = pack("nodes.host.model")
    training_host = pack("nodes.host.training")
    asked = []

    def resident_clone(model):
        asked.append(model)
        asked.append(host_model.resident_clone(model))
        return asked[-1]

    monkeypatch.setattr(training_host, "resident_clone", resident_clone)
    train(sd15, concept_images, steps=1, batch_size=1)
    assert asked and asked[0] is sd15[0], "training did not ask for a resident clone of its input model"
    assert any(patcher is asked[1] for patcher in loaded_for_training), "training loaded another patcher"
    assert not getattr(asked[1], "is_dynamic", lambda: False)()


@pytest.mark.skipif("not host_has_dynamic_vram()", reason="this ComfyUI has no dynamic VRAM loading")
def test_training_a_dynamic_model_asks_the_host_for_a_non_dynamic_clone(sd15, concept_images, loaded_for_training,
                                                                        monkeypatch):
    model = sd15[0].clone()
    assert model.cached_patcher_init is not None, "Load Checkpoint no longer records how to reload the model"
    calls = as_dynamic(model, monkeypatch)
    train((model, sd15[1], sd15[2]), concept_images, steps=1, batch_size=1)
    resident = [result for kwargs, result in calls if kwargs == {"disable_dynamic": True}]
    assert len(resident) == 1, f"training asked for {[kwargs for kwargs, _ in calls]}"
    # (the node's output MODEL is a plain clone of the input, as every patched MODEL is)
    assert any(patcher is resident[0] for patcher in loaded_for_training), "training loaded another patcher"


@pytest.mark.skipif("not host_has_dynamic_vram()", reason="this ComfyUI has no dynamic VRAM loading")
def test_a_dynamic_model_the_host_cannot_reload_is_refused_clearly(sd15, monkeypatch):
    model = sd15[0].clone()
    calls = as_dynamic(model, monkeypatch)
    monkeypatch.setattr(model, "cached_patcher_init", None)
    with pytest.raises(pack("perres_core.errors").PerResError, match="--disable-dynamic-vram"):
        pack("nodes.host.model").resident_clone(model)
    assert calls == []


def test_a_non_dynamic_model_gets_a_plain_clone(sd15):
    model = sd15[0]
    clone = pack("nodes.host.model").resident_clone(model)
    assert clone is not model and clone.model is model.model and clone.patches == model.patches
