"""Watching a training run and keeping its good steps, in the real host: previews through ComfyUI's progress
bar and latent previewer, the progress text on the node, snapshots along the way, Cancel and errors.

The websocket path (a client of a real server receiving the previews and the text) is in test_http_api.py.
"""
from __future__ import annotations

import logging
import os

import pytest
import torch

from comfy_host import executor_inputs
from conftest import pack, run_node
from host_helpers import TRAIN_DEFAULTS, layers_equal

TRAIN = "PerRes Train Residuals"


class ProgressRecorder:
    """Stands in for the executor's progress hook: every (value, total, preview) the node reports."""

    def __init__(self, stop_at: int | None = None, fail_at: int | None = None) -> None:
        self.updates: list[tuple[int, int, object]] = []
        self.stop_at, self.fail_at = stop_at, fail_at

    def __call__(self, value, total, preview, node_id=None) -> None:
        import comfy.model_management

        self.updates.append((value, total, preview))
        if value == self.stop_at:  # what the Cancel button does: the node's next check raises
            comfy.model_management.interrupt_current_processing(True)
        if value == self.fail_at:
            raise RuntimeError("simulated failure at this step")

    def previews(self) -> list[tuple[int, object]]:
        return [(value, preview) for value, _, preview in self.updates if preview is not None]


@pytest.fixture
def progress(host_root, monkeypatch):
    """Install a recorder as ComfyUI's global progress hook, with latent2rgb previews (the host's default
    for a server started with --preview-method auto; in-process it is 'none')."""
    import comfy.utils
    from comfy.cli_args import LatentPreviewMethod, args

    monkeypatch.setattr(args, "preview_method", LatentPreviewMethod.Latent2RGB)

    def install(**kwargs) -> ProgressRecorder:
        recorder = ProgressRecorder(**kwargs)
        monkeypatch.setattr(comfy.utils, "PROGRESS_BAR_HOOK", recorder)
        return recorder
    yield install
    import comfy.model_management
    comfy.model_management.interrupt_current_processing(False)


def pixels_of(image) -> torch.Tensor:
    import numpy as np

    return torch.from_numpy(np.asarray(image, dtype=np.float32))


def train_all(sd15, images, **overrides):
    """All four outputs of the Train node: (model, residuals, loss_map, snapshots)."""
    model, clip, vae = sd15
    return run_node("PerResTrainResiduals", model=model, clip=clip, vae=vae, images=images,
                    **{**TRAIN_DEFAULTS, **overrides})


def test_previews_come_at_the_first_every_nth_and_last_step_and_change_with_the_residual(sd15, concept_images,
                                                                                         progress):
    recorder = progress()
    trained = train_all(sd15, concept_images, steps=5, preview_every=2, learning_rate=5e-2, seed=2)[1]
    previews = recorder.previews()
    assert [value for value, _ in previews] == [1, 2, 4, 5]
    assert [value for value, _, _ in recorder.updates] == [1, 2, 3, 4, 5]
    kind, image, max_size = previews[0][1]
    assert kind == "JPEG" and image.size == (8, 8)   # latent2rgb: one pixel per latent cell of a 64 px image
    pixels = [pixels_of(image) for _, (_, image, _) in previews]
    assert (pixels[-1] - pixels[0]).abs().mean() > 0.5, "the preview did not change while the residual learned"

    # the same preview sample every time: a run that cannot learn (learning rate ~0) shows one picture
    recorder = progress()
    train_all(sd15, concept_images, steps=3, preview_every=1, learning_rate=1e-7, seed=2)
    frozen = [pixels_of(image) for _, (_, image, _) in recorder.previews()]
    assert len(frozen) == 3 and all((f - frozen[0]).abs().max() <= 1 for f in frozen)

    # previews do not change what is trained
    progress()
    without = train_all(sd15, concept_images, steps=5, preview_every=0, learning_rate=5e-2, seed=2)[1]
    assert layers_equal(trained, without)


def test_previews_follow_the_users_preview_setting(sd15, concept_images, progress, monkeypatch, tmp_path):
    """'none' sends no image; 'taesd' with a TAESD decoder installed decodes at full size (a random-weight
    decoder in a vae_approx folder of the test's own)."""
    import folder_paths
    from comfy.cli_args import LatentPreviewMethod, args
    from comfy.taesd.taesd import TAESD
    from safetensors.torch import save_file

    monkeypatch.setattr(args, "preview_method", LatentPreviewMethod.NoPreviews)
    recorder = progress()
    train_all(sd15, concept_images, steps=2, preview_every=1)
    assert recorder.previews() == [] and len(recorder.updates) == 2

    save_file(TAESD().taesd_decoder.state_dict(), str(tmp_path / "taesd_decoder.safetensors"))
    folder_paths.add_model_folder_path("vae_approx", str(tmp_path))
    monkeypatch.setattr(args, "preview_method", LatentPreviewMethod.TAESD)
    recorder = progress()
    train_all(sd15, concept_images, steps=1, preview_every=1)
    (_, (_, image, _)), = recorder.previews()
    assert image.size == (64, 64)


def test_the_node_shows_step_smoothed_loss_and_time_left(sd15, concept_images, progress, monkeypatch):
    import server
    from comfy_api.internal import shallow_clone_class
    from comfy_api.latest import io
    from comfy_api.latest._io import HiddenHolder
    import nodes

    sent = []

    class Frontend:
        client_id = "watcher"

        def send_progress_text(self, text, node_id, sid=None):
            sent.append((node_id, text))
    monkeypatch.setattr(server.PromptServer, "instance", Frontend(), raising=False)
    monkeypatch.setattr(pack("nodes.train_monitor"), "TEXT_INTERVAL_S", 0.0)
    progress()
    clone = shallow_clone_class(nodes.NODE_CLASS_MAPPINGS["PerResTrainResiduals"])
    clone.hidden = HiddenHolder.from_dict({io.Hidden.unique_id: "9"})
    model, clip, vae = sd15
    with torch.inference_mode():
        losses = clone.execute(**executor_inputs(clone, dict(model=model, clip=clip, vae=vae, images=concept_images,
                                                             **{**TRAIN_DEFAULTS, "steps": 3}))).result[2]["loss"]
    texts = [text for node, text in sent if node == "9"]
    assert len(texts) == 3
    assert texts[0].startswith("step 1/3 · loss ") and " left" in texts[0]
    assert texts[-1].startswith("step 3/3 · loss ") and "done in" in texts[-1]
    smoothed = float(texts[-1].split("loss ")[1].split(" ")[0])
    assert min(losses) - 1e-4 <= smoothed <= max(losses) + 1e-4


def test_snapshots_are_written_every_n_steps_and_listed(sd15, concept_images, progress, workdir):
    progress()
    prefix = "watch_tests/snap"
    _, final, _, snapshots = train_all(sd15, concept_images, steps=4, snapshot_every=2, snapshot_prefix=prefix, seed=3)
    loras = os.path.join(workdir, "models", "loras")
    names = sorted(os.listdir(os.path.join(loras, "watch_tests")))
    assert names == ["snap_step00002_00001.safetensors", "snap_step00004_00001.safetensors"]
    # the output list: every snapshot, the last being the final residual itself
    assert [s.training["steps"] for s in snapshots] == [2, 4] and snapshots[-1] is final
    files = pack("perres_core.residual_file")
    step2 = files.load_residual_file(os.path.join(loras, "watch_tests", names[0]))
    assert step2.training["steps"] == "2" and step2.training["snapshot_of_steps"] == "4"
    assert layers_equal(step2, snapshots[0])
    # the step-2 snapshot is what a 2-step run with the same seed trains
    assert layers_equal(step2, train_all(sd15, concept_images, steps=2, seed=3)[1])
    listed = pack("nodes.file_nodes").residual_file_list()
    assert {f"watch_tests/{name}" for name in names} <= set(listed)
    # a second run never overwrites
    train_all(sd15, concept_images, steps=2, snapshot_every=2, snapshot_prefix=prefix, seed=4)
    assert "snap_step00002_00002.safetensors" in os.listdir(os.path.join(loras, "watch_tests"))
    assert layers_equal(files.load_residual_file(os.path.join(loras, "watch_tests", names[0])), step2)


def test_without_snapshots_the_list_holds_the_final_residual(sd15, concept_images, progress):
    progress()
    _, final, _, snapshots = train_all(sd15, concept_images, steps=3, snapshot_every=2,
                                       snapshot_prefix="watch_tests/odd")
    assert [s.training["steps"] for s in snapshots] == [2, 3] and snapshots[-1] is final
    _, final, _, snapshots = train_all(sd15, concept_images, steps=1)
    assert snapshots == [final]


def test_cancel_keeps_the_snapshots_and_says_so(sd15, concept_images, progress, workdir, caplog):
    import comfy.model_management

    progress(stop_at=3)
    with caplog.at_level(logging.WARNING, logger="perres"), \
            pytest.raises(comfy.model_management.InterruptProcessingException):
        train_all(sd15, concept_images, steps=6, snapshot_every=1, snapshot_prefix="watch_tests/cancelled")
    comfy.model_management.interrupt_current_processing(False)
    kept = sorted(n for n in os.listdir(os.path.join(workdir, "models", "loras", "watch_tests"))
                  if n.startswith("cancelled"))
    assert kept == [f"cancelled_step0000{step}_00001.safetensors" for step in (1, 2, 3)]
    message = next(r.getMessage() for r in caplog.records if "cancelled" in r.getMessage())
    assert "the 3 snapshot(s) written before it are kept" in message
    assert "models/loras/watch_tests/cancelled_step00003_00001.safetensors" in message


def test_an_error_keeps_the_snapshots_and_names_them(sd15, concept_images, progress, workdir):
    progress(fail_at=2)
    with pytest.raises(pack("perres_core.errors").PerResError) as info:
        train_all(sd15, concept_images, steps=4, snapshot_every=1, snapshot_prefix="watch_tests/failed")
    message = str(info.value)
    assert message.startswith(TRAIN + ": simulated failure at this step")
    assert "the 2 snapshot(s) written before it are kept" in message and "failed_step00002_00001" in message
    assert os.path.exists(os.path.join(workdir, "models", "loras", "watch_tests", "failed_step00001_00001.safetensors"))


@pytest.mark.parametrize("overrides, fragment", [
    ({"snapshot_every": -1}, "snapshot_every must be 0 (off) or a number of steps"),
    ({"snapshot_every": 2, "snapshot_prefix": "../escape"}, "snapshot_prefix '../escape' contains '..'"),
    ({"crop": "stretch"}, "crop must be one of center, buckets"),
])
def test_bad_watch_settings_are_refused_before_training(sd15, concept_images, progress, overrides, fragment):
    recorder = progress()
    with pytest.raises(pack("perres_core.errors").PerResError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        train_all(sd15, concept_images, **overrides)
    assert recorder.updates == []
