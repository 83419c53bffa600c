"""Training at the paper's scale, in the real host: gradient checkpointing, fp16/bf16 UNets, out of memory.

The memory and speed figures themselves are benchmarks (benchmarks/bench_paper_scale.py); these tests
prove the code paths on the random SD1.5 checkpoint at 64 px on the CPU.
"""
from __future__ import annotations

import gc
import json
import os
import struct
import weakref

import pytest
import torch

from conftest import pack, run_node
from host_helpers import factors, held_out_loss, train, untrained_residuals

HALF = {"fp16": torch.float16, "bf16": torch.bfloat16}


def transformer_call_counter(model):
    """Counts calls of every SpatialTransformer's proj_out (one per forward of that block)."""
    counts = {"calls": 0}
    unet, sd1 = model.model.diffusion_model, pack("perres_core.families").SD1
    handles = [transformer.proj_out.register_forward_pre_hook(lambda *_: counts.__setitem__("calls", counts["calls"] + 1))
               for _, transformer in pack("nodes.host.model").transformer_modules(unet, sd1)]
    return counts, handles


def test_gradient_checkpointing_gives_the_same_residual_and_recomputes_each_block(sd15, concept_images):
    """Same seed with and without checkpointing: the same trained residual to fp32 tolerance. With it,
    each of the 16 transformer blocks runs twice per step (forward, then recomputed in backward)."""
    model = sd15[0]
    results, calls = {}, {}
    for flag in (False, True):
        counts, handles = transformer_call_counter(model)
        try:
            results[flag] = train(sd15, concept_images, steps=2, batch_size=2, seed=5, learning_rate=1e-2,
                                  gradient_checkpointing=flag)
        finally:
            for handle in handles:
                handle.remove()
        calls[flag] = counts["calls"]
    assert calls == {False: 2 * 16, True: 2 * 2 * 16}
    assert results[False][2]["loss"] == pytest.approx(results[True][2]["loss"], rel=1e-6)
    plain, checkpointed = factors(results[False][1]), factors(results[True][1])
    start = factors(untrained_residuals(5))
    for key in plain:
        torch.testing.assert_close(checkpointed[key], plain[key], rtol=1e-5, atol=1e-6)
    assert any(not torch.equal(plain[key], start[key]) for key in plain), "training changed nothing"
    unet = model.model.diffusion_model
    assert not any("forward" in m.__dict__ for m in unet.modules()), "a checkpoint wrapper was left on the UNet"


@pytest.fixture(scope="module", params=sorted(HALF))
def half_sd15(request, checkpoint_name, workdir):
    """(model, clip, vae) with the UNet stored in fp16/bf16 and told to compute in it, as on a GPU.

    On the CPU ComfyUI would otherwise up-cast a half UNet to fp32 (model_management.unet_manual_cast);
    set_model_compute_dtype is the host's own switch (TrainLoraNode uses it).
    """
    import comfy.sd

    dtype = HALF[request.param]
    path = os.path.join(workdir, "models", "checkpoints", checkpoint_name)
    model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(path, output_vae=True, output_clip=True,
                                                                model_options={"dtype": dtype})
    assert model.model.get_dtype() == dtype
    model.set_model_compute_dtype(dtype)
    yield model, clip, vae
    del model, clip, vae
    gc.collect()


def safetensors_header(path: str) -> dict:
    with open(path, "rb") as handle:
        size = struct.unpack("<Q", handle.read(8))[0]
        return json.loads(handle.read(size))


def test_half_precision_unet_trains_with_fp32_residuals_and_loss(half_sd15, sd15, concept_images, workdir,
                                                                 monkeypatch):
    """The UNet computes in fp16/bf16; the residual stays fp32, fp16 uses loss scaling, the losses are finite,
    the held-out ε-loss (measured in the same dtype) drops, and the saved file is the fp32 run's format."""
    host = pack("nodes.host.training")
    model, clip, vae = half_sd15
    dtype = model.model.get_dtype()
    scalers = []

    def recording_scaler(*args):
        scaler = real_scaler(*args)
        if scaler is not None:
            scale = scaler.scale
            scaler.scale = lambda loss: scalers.append(loss.dtype) or scale(loss)
        return scaler

    real_scaler = host.loss_scaler
    monkeypatch.setattr(host, "loss_scaler", recording_scaler)
    seed, steps = 4, 4
    trained, loss = train(half_sd15, concept_images, steps=steps, batch_size=2, seed=seed, learning_rate=3e-3)[1:]
    assert all(torch.isfinite(torch.tensor(loss["loss"]))) and len(loss["loss"]) == steps
    assert {p.dtype for p in trained.parameters()} == {torch.float32}
    assert scalers == ([torch.float32] * steps if dtype == torch.float16 else []), "fp16 must scale the fp32 loss"
    before = held_out_loss(model, clip, vae, concept_images, untrained_residuals(seed), dtype=dtype)
    after = held_out_loss(model, clip, vae, concept_images, trained, dtype=dtype)
    assert after < before * 0.995, f"{dtype}: held-out ε-loss did not drop: {before:.5f} → {after:.5f}"

    reference = train(sd15, concept_images, steps=1, batch_size=2, seed=seed)[1]
    names = [run_node("PerResSaveResiduals", residuals=r, filename_prefix=f"perres/format_{dtype}")[0]
             for r in (trained, reference)]
    half_header, fp32_header = (safetensors_header(os.path.join(workdir, "models", "loras", n)) for n in names)
    assert {k: (v["dtype"], v["shape"]) for k, v in half_header.items() if k != "__metadata__"} == \
        {k: (v["dtype"], v["shape"]) for k, v in fp32_header.items() if k != "__metadata__"}
    assert set(half_header["__metadata__"]) == set(fp32_header["__metadata__"])


def test_out_of_memory_is_a_clear_error_that_leaves_nothing_behind(sd15, concept_images):
    """An allocation that fails mid-step gives a PerResError naming the node, resolution and batch size with
    what to change; hooks, wrappers and activations are released, the input model is untouched, and the next
    run trains."""
    errors = pack("perres_core.errors")
    model = sd15[0]
    unet = model.model.diffusion_model
    proj_outs = [t.proj_out for _, t in pack("nodes.host.model").transformer_modules(unet, pack("perres_core.families").SD1)]
    flags_before = [p.requires_grad for p in unet.parameters()]
    patches_before, uuid_before = dict(model.patches), model.patches_uuid
    activations = []

    def fail(module, args, output):
        activations.append(weakref.ref(output))
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    handle = unet.output_blocks[5][1].register_forward_hook(fail)  # the last 16×16 transformer: mid-forward
    try:
        for checkpointing in (False, True):
            with pytest.raises(errors.PerResError) as info:
                train(sd15, concept_images, steps=3, batch_size=4, gradient_checkpointing=checkpointing)
            message = str(info.value)
            assert message.startswith("PerRes Train Residuals: out of memory")
            assert "64 px" in message and "batch_size 4" in message and "lower batch_size" in message
            assert "resolution" in message and "Nothing was saved" in message
            assert ("turn on gradient_checkpointing" in message) is (not checkpointing)
            chain, exc = [], info.value
            while exc is not None:
                chain.append(exc)
                exc = exc.__cause__ or exc.__context__
            assert not any(isinstance(e, torch.OutOfMemoryError) for e in chain), "the OOM and its frames must go"
            del info
    finally:
        handle.remove()
    gc.collect()
    assert len(activations) == 2 and all(ref() is None for ref in activations), "activations were kept alive"
    assert all(not conv._forward_hooks for conv in proj_outs), "residual hooks were left on the UNet"
    assert not any("forward" in m.__dict__ for m in unet.modules()), "a checkpoint wrapper was left on the UNet"
    assert [p.requires_grad for p in unet.parameters()] == flags_before
    assert model.patches == patches_before and model.patches_uuid == uuid_before
    loss = train(sd15, concept_images, steps=1, batch_size=4)[2]["loss"]
    assert len(loss) == 1 and torch.isfinite(torch.tensor(loss)).all()
