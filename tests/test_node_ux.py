"""What the user sees in the frontend, in the real host: warnings on the node, and the residual list.

The websocket path of a warning (PromptServer.send_progress_text → a client of the real server) is
tested in test_http_api.py; here every warning site must hand its text and its node's prompt id to it.
"""
from __future__ import annotations

import os

import pytest
import torch

from comfy_host import executor_inputs
from conftest import pack, run_node

pytestmark = pytest.mark.every_host  # the text the host's server shows on nodes


class FrontendText:
    """Records what PromptServer.send_progress_text would send to the frontend."""

    client_id = "perres-client"

    def __init__(self) -> None:
        self.sent: list[tuple[str, str, str]] = []

    def send_progress_text(self, text, node_id, sid=None) -> None:
        self.sent.append((node_id, text, sid))


@pytest.fixture
def frontend(host_root, monkeypatch) -> FrontendText:
    import server

    recorder = FrontendText()
    monkeypatch.setattr(server.PromptServer, "instance", recorder, raising=False)
    return recorder


def run_in_prompt(class_type: str, unique_id: str, **inputs):
    """Execute a node as the executor does for node `unique_id` of a prompt (with its hidden inputs set)."""
    import nodes
    from comfy_api.internal import shallow_clone_class
    from comfy_api.latest import io
    from comfy_api.latest._io import HiddenHolder

    clone = shallow_clone_class(nodes.NODE_CLASS_MAPPINGS[class_type])
    clone.hidden = HiddenHolder.from_dict({io.Hidden.unique_id: unique_id})
    with torch.inference_mode():
        return clone.execute(**executor_inputs(clone, inputs)).result


def untrained_residuals(identifier: str = "sks", class_word: str = "dog"):
    residual = pack("perres_core.residual")
    residuals = residual.ResidualSet.create(pack("perres_core.families").SD1.layer_shapes(), 0.05,
                                            concept=residual.ConceptInfo(identifier, class_word))
    residuals.initialize("zero", 0)
    return residuals


def test_training_warnings_appear_on_the_train_node(sd15, frontend):
    """A multi-token identifier and fewer images than batch_size: both warnings, in one text on node 7."""
    model, clip, vae = sd15
    images = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(3))
    run_in_prompt("PerResTrainResiduals", "7", model=model, clip=clip, vae=vae, images=images,
                  identifier="qzxvkwy", class_word="dog", steps=1, batch_size=2, learning_rate=1e-3,
                  rank_ratio=0.05, resolution=64, seed=0, init="random")
    assert {node for node, _, _ in frontend.sent} == {"7"}
    node, text, sid = frontend.sent[-1]  # the node keeps the last text: the warnings, then the progress line
    assert sid == FrontendText.client_id
    assert "identifier 'qzxvkwy' is split into several tokens" in text
    assert "1 image(s) for batch size 2; batches are drawn with replacement" in text
    assert "step 1/1 · loss" in text


def test_missing_concept_words_appear_on_the_lag_node(sd15, frontend):
    model, clip, _ = sd15
    run_in_prompt("PerResLAGSampling", "12", model=model, clip=clip, residuals=untrained_residuals(),
                  prompt="a photo of a cat", concept_words="", strength=1.0, threshold="median", quantile=0.5,
                  start_percent=0.0, end_percent=1.0, outside_window="full residual")
    assert len(frontend.sent) == 1
    node, text, _ = frontend.sent[0]
    assert node == "12" and "'sks', 'dog' not in the prompt" in text and "applied everywhere" in text


def test_no_warning_no_text(sd15, frontend):
    model, clip, _ = sd15
    run_in_prompt("PerResLAGSampling", "12", model=model, clip=clip, residuals=untrained_residuals(),
                  prompt="a photo of a sks dog", concept_words="", strength=1.0, threshold="median", quantile=0.5,
                  start_percent=0.0, end_percent=1.0, outside_window="full residual")
    assert frontend.sent == []


def lag_in_prompt(sd15, prompt: str):
    """PerRes LAG Sampling as node 12 of a prompt: (patched model, its positive conditioning)."""
    model, clip, _ = sd15
    return run_in_prompt("PerResLAGSampling", "12", model=model, clip=clip, residuals=untrained_residuals(),
                         prompt=prompt, concept_words="", strength=1.0, threshold="median", quantile=0.5,
                         start_percent=0.0, end_percent=1.0, outside_window="full residual")


def test_a_sampler_fed_other_conditioning_warns_on_the_lag_node(sd15, frontend):
    """The concept words' positions come from the LAG prompt: another encoder's prompt puts other words there."""
    from host_helpers import encode, sample

    clip = sd15[1]
    patched, positive = lag_in_prompt(sd15, "a photo of a sks dog")
    negative = encode(clip, "")
    sample(patched, positive, negative, steps=1)
    sample(patched, encode(clip, "a photo of a sks dog"), negative, steps=1)  # the same text: the same encoding
    combined = run_node("ConditioningCombine", conditioning_1=encode(clip, "a watercolor painting"),
                        conditioning_2=positive)[0]
    sample(patched, combined, negative, steps=1)  # one of the positive conditionings is the LAG prompt
    assert frontend.sent == []
    sample(patched, encode(clip, "a dog photo, sks style"), negative, steps=1)
    assert len(frontend.sent) == 1
    node, text, _ = frontend.sent[0]
    assert node == "12" and "positive conditioning is not this node's prompt" in text
    sample(patched, encode(clip, "a dog photo, sks style"), negative, steps=1)
    assert len(frontend.sent) == 1  # once per patched model, not once per run


def test_a_sampler_fed_a_longer_prompt_warns_on_the_lag_node(sd15, frontend):
    """154 tokens starting with the LAG prompt's words, then more: still not the LAG prompt's encoding."""
    from host_helpers import encode, sample

    clip = sd15[1]
    patched, _ = lag_in_prompt(sd15, "a photo of a sks dog")
    long_prompt = ", ".join(["a photo of a sks dog on a beach at sunset"] * 10)  # over 77 tokens
    sample(patched, encode(clip, long_prompt), encode(clip, ""), steps=1)
    assert [node for node, _, _ in frontend.sent] == ["12"]
    assert "positive conditioning is not this node's prompt" in frontend.sent[0][1]


def residual_names() -> list[str]:
    import nodes

    info = nodes.NODE_CLASS_MAPPINGS["PerResLoadResiduals"].GET_NODE_INFO_V1()
    return info["input"]["required"]["residual_name"][1]["options"]


def test_residual_list_holds_perres_files_only_also_new_ones(workdir):
    """Files saved after the host started are listed; an ordinary LoRA beside them is not."""
    from safetensors.torch import save_file

    before = residual_names()
    saved = run_node("PerResSaveResiduals", residuals=untrained_residuals(), filename_prefix="perres/listing")[0]
    lora = os.path.join(workdir, "models", "loras", "perres", "ordinary_listing.safetensors")
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(320, 4, 1, 1)}, lora,
              metadata={"ss_network_module": "networks.lora"})
    names = residual_names()
    assert saved not in before and saved in names
    assert "perres/ordinary_listing.safetensors" not in names
