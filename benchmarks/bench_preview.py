"""What the live preview of PerRes Train Residuals costs: preview_every 0 (off) vs 10 (the default) vs 1.

One run, one model (the tests' random-weight SD1.5 checkpoint, fp32), one batch and resolution, and one row
per gradient-checkpointing setting (--checkpointing on,off: the node's default first). Every row runs the
PerResTrainResiduals node with each --preview-every value, --rounds times, in a rotating order after one
untimed warm-up run, and compares seconds per training step.

With previews on, after every preview_every-th step (and the first and the last) the node runs one extra
batch-1 no-grad UNet forward on a fixed noised latent (perres_core.preview.PreviewSample.denoise) and turns
its x̂₀ into an image with ComfyUI's latent previewer (latent_preview.get_previewer), which it hands to
comfy.utils.ProgressBar.update_absolute; every step it also sends a line of text (step, smoothed loss, time
left). ComfyUI's --preview-method defaults to "none", and a host started in-process keeps that default, so
get_previewer would return None and no preview would ever be made: this script sets the method explicitly
(--preview-method, latent2rgb by default; "auto" is latent2rgb too without a TAESD decoder in
models/vae_approx) and checks that the previews were made. Where ComfyUI's server would receive them, a
progress-bar hook does the server's part in-process and counts them: the image is resized to
--preview-size and JPEG-encoded as server.send_image does (in ComfyUI that runs on the server's thread, on
the same cores), and the text line is packed as PromptServer.send_progress_text packs it.

Timing: a run of S = --steps steps is timed from the end of its first step's callback (the warm-up step,
with its first preview) to the end of its last step's callback, so S - 1 training steps and the previews
at steps 10, 20, ... and S fall inside: at S = 10 (the default) that is 1 preview in 9 steps, about the
density of a 150-step run at the default preview_every (16 in 150). Per-run s/step is that span / (S - 1)
(a mean: a median over steps would skip the few steps that preview); medians over rounds are compared.
The per-preview cost is measured twice: from the spans ((preview run - off run) / previews in the span),
and directly in the node's step callback (nodes.train_monitor.TrainingMonitor.__call__, wrapped here; the
pack is not modified) with and without a preview, split into the UNet forward and the image decode and
encode. The direct figure gives a cost at the node's defaults (150 steps, preview_every 10) that other
processes cannot disturb much: previews x ms per preview / (150 x s/step with previews off).

Run from the pack root:  python benchmarks/bench_preview.py [--resolution 128] [--batch 4] [--steps 10]
"""
from __future__ import annotations

import argparse
import os
import struct
import sys
import time
import types

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_common as bc  # noqa: E402
from bench_training import make_images  # noqa: E402

TARGET = 0.03  # the issue: cost at the defaults <= 3 % of training time
PREVIEW_METHODS = ("latent2rgb", "auto", "taesd")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--resolution", type=int, default=128, help="image side in px (latent = /8); default 128")
    p.add_argument("--batch", type=int, default=4, help="images per step; default 4 (the node's default)")
    p.add_argument("--steps", type=int, default=10,
                   help="steps per node run; the first is warm-up, the rest are timed (default 10)")
    p.add_argument("--rounds", type=int, default=2, help="timed runs of each preview setting per row; default 2")
    p.add_argument("--preview-every", default="0,10,1",
                   help="preview_every values to compare, comma-separated; the first must be 0 (off); default 0,10,1")
    p.add_argument("--checkpointing", default="on,off",
                   help="gradient checkpointing settings, one row each: on (the node's default), off, or on,off")
    p.add_argument("--preview-method", default="latent2rgb", choices=PREVIEW_METHODS,
                   help="ComfyUI's --preview-method for the run (its own default is none: no previews)")
    p.add_argument("--preview-size", type=int, default=0,
                   help="ComfyUI's --preview-size (the server resizes previews to it); 0 keeps the host's, 512")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0 = leave torch's default)")
    opts = p.parse_args()
    names = [name.strip() for name in opts.checkpointing.split(",") if name.strip()]
    if not names or set(names) - {"off", "on"}:
        p.error(f"--checkpointing takes on, off or on,off; got {opts.checkpointing!r}")
    opts.checkpointing = [name == "on" for name in names]
    try:
        opts.preview_every = [int(value) for value in opts.preview_every.split(",") if value.strip()]
    except ValueError:
        p.error(f"--preview-every takes comma-separated integers; got {opts.preview_every!r}")
    if len(opts.preview_every) < 2 or opts.preview_every[0] != 0 or any(v < 0 for v in opts.preview_every):
        p.error("--preview-every needs 0 (off) first and at least one preview interval, e.g. 0,10,1")
    if opts.steps < 3:
        p.error("--steps must be at least 3 (one warm-up step, then the timed ones)")
    return opts


def expected_previews(steps: int, every: int) -> list[int]:
    """The steps (1-based) that preview: the first, every `every`-th and the last (nodes/train_monitor.py)."""
    return [] if not every else [done for done in range(1, steps + 1)
                                 if done == 1 or done % every == 0 or done == steps]


def set_preview_method(name: str, size: int) -> str:
    """Set ComfyUI's --preview-method (and --preview-size) in this process; returns what was set."""
    import latent_preview
    from comfy.cli_args import LatentPreviewMethod, args
    method = LatentPreviewMethod(name)
    args.preview_method = method
    if hasattr(latent_preview, "default_preview_method"):  # 0.33.0: the executor resets to it per prompt
        latent_preview.default_preview_method = method
    if size:
        args.preview_size = size
        latent_preview.MAX_PREVIEW_RESOLUTION = size
    return f"{method.value} (ComfyUI's default: none), preview size {latent_preview.MAX_PREVIEW_RESOLUTION}"


class StepLog:
    """Per call of the node's step callback: step, wall/cpu start and end, whether it made a preview; plus
    the preview's UNet forwards (no-grad), the previewer's decode and the server-side encode, in seconds."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, float, float, float, float, bool]] = []
        self.forwards: list[float] = []
        self.train_forwards: list[float] = []
        self.decodes: list[float] = []
        self.encodes: list[float] = []
        self.hook_previews = 0
        self.texts = 0
        self.previewers: set[str] = set()
        self.monitor_previews: list[int] = []
        self._forward_start = None

    def reset(self) -> None:
        self.__init__()

    def span(self, steps: int) -> tuple[float, float, int]:
        """Wall and CPU seconds from the end of step 1's callback to the end of step `steps`'s, and the
        previews in between."""
        by_step = {call[0]: call for call in self.calls}
        first, last = by_step[1], by_step[steps]
        previews = sum(1 for call in self.calls if 1 < call[0] <= steps and call[5])
        return last[2] - first[2], last[4] - first[4], previews

    def callback_ms(self, with_preview: bool) -> list[float]:
        """Wall milliseconds of the callbacks after the first step that did (or did not) preview."""
        return [(end - start) * 1000 for step, start, end, _, _, previewed in self.calls
                if step > 1 and previewed == with_preview]


class Instruments:
    """Wrap, for the benchmark process only, what the node's preview goes through: TrainingMonitor.__call__
    (timed, and whether monitor.previews grew), latent_preview.get_previewer (its decode timed), the UNet's
    forwards (the preview's, without grad, apart from the training's), the progress-bar hook (the server's
    encode of the preview, a count) and the server's send_progress_text (the text line, a count)."""

    def __init__(self, log: StepLog, unet) -> None:
        self.log, self.unet = log, unet
        self._undo: list = []

    def __enter__(self) -> "Instruments":
        import comfy.utils
        import latent_preview
        import torch
        monitor_cls = bc.pack_module("nodes.train_monitor").TrainingMonitor
        log = self.log

        original_call = monitor_cls.__call__

        def timed_call(monitor, step, loss, denoise):
            before = monitor.previews
            wall, cpu = time.perf_counter(), bc.cpu_time()
            original_call(monitor, step, loss, denoise)
            bc.sync()
            log.calls.append((step + 1, wall, time.perf_counter(), cpu, bc.cpu_time(), monitor.previews > before))
            if step + 1 == monitor.steps:
                log.monitor_previews.append(monitor.previews)

        monitor_cls.__call__ = timed_call
        self._undo.append(lambda: setattr(monitor_cls, "__call__", original_call))

        original_get = latent_preview.get_previewer

        def get_previewer(device, latent_format):
            previewer = original_get(device, latent_format)
            if previewer is not None:
                log.previewers.add(type(previewer).__name__)
                decode = previewer.decode_latent_to_preview_image

                def timed_decode(preview_format, x0):
                    t0 = time.perf_counter()
                    out = decode(preview_format, x0)
                    log.decodes.append(time.perf_counter() - t0)
                    return out
                previewer.decode_latent_to_preview_image = timed_decode
            return previewer

        latent_preview.get_previewer = get_previewer
        self._undo.append(lambda: setattr(latent_preview, "get_previewer", original_get))

        def pre(module, args):
            bc.sync()
            log._forward_start = time.perf_counter()

        def post(module, args, output):
            if log._forward_start is not None:
                bc.sync()
                # the preview's forward runs under no_grad (PreviewSample.denoise), the training's with grad
                (log.train_forwards if torch.is_grad_enabled() else log.forwards).append(
                    time.perf_counter() - log._forward_start)
                log._forward_start = None

        handles = [self.unet.register_forward_pre_hook(pre), self.unet.register_forward_hook(post)]
        self._undo.append(lambda: [h.remove() for h in handles])

        previous_hook = comfy.utils.PROGRESS_BAR_HOOK

        def hook(value, total, preview, node_id=None):
            if preview is not None:
                t0 = time.perf_counter()
                server_encode(preview)
                log.encodes.append(time.perf_counter() - t0)
                log.hook_previews += 1

        comfy.utils.set_progress_bar_global_hook(hook)
        self._undo.append(lambda: comfy.utils.set_progress_bar_global_hook(previous_hook))
        self._undo.append(stand_in_server(log))
        return self

    def __exit__(self, *exc) -> None:
        for undo in reversed(self._undo):
            undo()


def server_encode(preview) -> bytes:
    """What ComfyUI's server does with a preview before sending it (server.send_image): fit it into the
    preview size, then JPEG quality 95 after a 4-byte type header."""
    from io import BytesIO

    from PIL import Image, ImageOps
    image_type, image, max_size = preview
    if max_size is not None:
        resampling = Image.Resampling.BILINEAR if hasattr(Image, "Resampling") else Image.LANCZOS
        image = ImageOps.contain(image, (max_size, max_size), resampling)
    buffer = BytesIO()
    buffer.write(struct.pack(">I", 1 if image_type == "JPEG" else 2))
    image.save(buffer, format=image_type, quality=95, compress_level=1)
    return buffer.getvalue()


def stand_in_server(log: StepLog):
    """PromptServer.instance for the node's text line (nodes/node_warnings.py looks it up in
    sys.modules['server']): packs the message as send_progress_text does and counts it. Returns the undo."""
    class Server:
        client_id = None

        def send_progress_text(self, text, node_id, sid=None):
            data = text.encode("utf-8") if isinstance(text, str) else text
            node = str(node_id).encode("utf-8")
            message = struct.pack(">I", len(node)) + node + data
            if message:
                log.texts += 1

    module = sys.modules.get("server")
    if module is not None and hasattr(module, "PromptServer"):  # imported, but never started in-process
        cls = module.PromptServer
        missing = object()
        previous = cls.__dict__.get("instance", missing)
        cls.instance = Server()
        return lambda: delattr(cls, "instance") if previous is missing else setattr(cls, "instance", previous)
    stub = types.ModuleType("server")
    stub.PromptServer = type("PromptServer", (), {"instance": Server()})
    sys.modules["server"] = stub
    return lambda: sys.modules.pop("server", None)


def train_node_with_id():
    """PerResTrainResiduals as the executor hands it a node id (a class clone with hidden.unique_id), so its
    text line goes to the server as in ComfyUI; every input as a list (is_input_list), in inference mode."""
    import nodes
    import torch
    from comfy_api.latest import _io

    cls = nodes.NODE_CLASS_MAPPINGS["PerResTrainResiduals"]
    clone = type(cls.__name__, (cls,), {})
    clone.hidden = _io.HiddenHolder.from_dict({_io.Hidden.unique_id: "bench"})

    def run(**inputs):
        with torch.inference_mode():
            return clone.execute(**{name: [value] for name, value in inputs.items()})
    return run


def node_default(name: str):
    import nodes
    cls = nodes.NODE_CLASS_MAPPINGS["PerResTrainResiduals"]
    for item in cls.define_schema().inputs:
        if getattr(item, "id", None) == name:
            return item.default
    raise SystemExit(f"PerResTrainResiduals has no input {name!r}")


def main() -> None:
    opts = parse_args()
    model, clip, vae = bc.load_sd15(opts.device, opts.threads)
    import torch
    say = bc.say
    method = set_preview_method(opts.preview_method, opts.preview_size)
    images = make_images(opts.batch, opts.resolution)
    train = train_node_with_id()
    default_steps, default_every = node_default("steps"), node_default("preview_every")
    say(f"model dtype {model.model.get_dtype()}, load device {model.load_device}; images {tuple(images.shape)}; "
        f"preview method {method}")
    say(f"settings: resolution {opts.resolution}, batch {opts.batch}, {opts.steps} steps per run (1 warm-up), "
        f"preview_every {opts.preview_every} x {opts.rounds} rounds, fp32, device {opts.device}, torch threads "
        f"{torch.get_num_threads()}; {bc.load_note()}")

    def run(steps: int, every: int, checkpointing: bool, seed: int):
        return train(model=model, clip=clip, vae=vae, images=images, identifier="sks", class_word="dog",
                     steps=steps, batch_size=opts.batch, learning_rate=1e-3, rank_ratio=0.05,
                     resolution=opts.resolution, seed=seed, init="random", gradient_checkpointing=checkpointing,
                     preview_every=every)

    def row(checkpointing: bool) -> str:
        return f"checkpointing {'on' if checkpointing else 'off'}"

    log = StepLog()
    # keyed by (checkpointing, preview_every)
    wall: dict[tuple, list[float]] = {}
    cpu: dict[tuple, list[float]] = {}
    spans: dict[tuple, list[tuple[float, int]]] = {}
    with_preview_ms: dict[tuple, list[float]] = {}
    without_preview_ms: dict[tuple, list[float]] = {}
    forward_ms: dict[tuple, list[float]] = {}
    train_forward_ms: dict[bool, list[float]] = {}
    decode_ms: dict[tuple, list[float]] = {}
    encode_ms: dict[tuple, list[float]] = {}
    counts: dict[tuple, list[str]] = {}
    texts: list[int] = []
    previewers: set[str] = set()
    problems: list[str] = []
    with Instruments(log, model.model.diffusion_model):
        for checkpointing in opts.checkpointing:
            log.reset()
            t0 = time.perf_counter()
            run(3, max(opts.preview_every), checkpointing, seed=99)  # warm-up: first shapes, allocations
            say(f"[{row(checkpointing)}] warm-up run (3 steps, preview_every {max(opts.preview_every)}): "
                f"{time.perf_counter() - t0:.2f} s, {log.hook_previews} previews")
            for r in range(opts.rounds):
                # rotate the order each round, so drifting machine load does not favour one setting
                shift = r % len(opts.preview_every)
                order = opts.preview_every[shift:] + opts.preview_every[:shift]
                for every in order:
                    key = (checkpointing, every)
                    log.reset()
                    t0 = time.perf_counter()
                    run(opts.steps, every, checkpointing, seed=r)
                    total = time.perf_counter() - t0
                    span_wall, span_cpu, in_span = log.span(opts.steps)
                    wall.setdefault(key, []).append(span_wall / (opts.steps - 1))
                    cpu.setdefault(key, []).append(span_cpu / (opts.steps - 1))
                    spans.setdefault(key, []).append((span_wall, in_span))
                    with_preview_ms.setdefault(key, []).extend(log.callback_ms(True))
                    without_preview_ms.setdefault(key, []).extend(log.callback_ms(False))
                    # the first preview (step 1) is the first batch-1 forward of the run: keep it out
                    forward_ms.setdefault(key, []).extend(f * 1000 for f in log.forwards[1:])
                    train_forward_ms.setdefault(checkpointing, []).extend(f * 1000 for f in log.train_forwards[1:])
                    decode_ms.setdefault(key, []).extend(d * 1000 for d in log.decodes[1:])
                    encode_ms.setdefault(key, []).extend(e * 1000 for e in log.encodes[1:])
                    expected = len(expected_previews(opts.steps, every))
                    monitor = log.monitor_previews[-1] if log.monitor_previews else "?"
                    counts.setdefault(key, []).append(f"{log.hook_previews}/{monitor}/{expected}")
                    texts.append(log.texts)
                    previewers |= log.previewers
                    if log.hook_previews != expected or monitor != expected:
                        problems.append(f"{row(checkpointing)}, preview_every {every}, round {r + 1}: "
                                        f"{log.hook_previews} previews reached the progress bar, monitor.previews "
                                        f"{monitor}, expected {expected}")
                    if log.texts != opts.steps:
                        problems.append(f"{row(checkpointing)}, preview_every {every}, round {r + 1}: {log.texts} "
                                        f"text lines for {opts.steps} steps")
                    say(f"[{row(checkpointing)}, round {r + 1}] preview_every {every:3d}: s/step wall "
                        f"{span_wall / (opts.steps - 1):.3f} cpu {span_cpu / (opts.steps - 1):.3f} "
                        f"({in_span} preview(s) in the timed span; node call {total:.2f} s; previews "
                        f"hook/monitor/expected {counts[key][-1]})")

    say("")
    say("=" * 78)
    bc.say_settings(opts, "per training step, PerResTrainResiduals with previews off (preview_every 0) vs on, "
                          "one row per gradient-checkpointing setting")
    say(f"PREVIEW  ComfyUI {bc.comfy_version('')}  resolution {opts.resolution}px  batch {opts.batch}  "
        f"{opts.steps} steps/run ({opts.steps - 1} timed)  x {opts.rounds} rounds  fp32  device {opts.device}  "
        f"torch threads {torch.get_num_threads()}")
    say(f"  preview method set to {method}; previewer used: {', '.join(sorted(previewers)) or 'NONE'}")
    say(f"  previews are encoded as the server would (JPEG q95 at the preview size) in the progress-bar hook; "
        f"text lines sent: {sorted(set(texts))} per run")
    say(f"  {bc.load_note()}")
    if problems or not previewers:
        say("  PREVIEW COUNT PROBLEMS: " + ("; ".join(problems) or "no previewer was created"))
    verdicts: list[str] = []
    for checkpointing in opts.checkpointing:
        off = (checkpointing, 0)
        off_wall, off_cpu = bc.median(wall[off]), bc.median(cpu[off])
        off_span = bc.median([span for span, _ in spans[off]])
        off_callback = bc.median(without_preview_ms[off])
        say(f"  -- {row(checkpointing)}")
        say(f"    preview_every   0 (off): s/step wall {bc.spread(wall[off])}")
        say(f"                                  cpu  {bc.spread(cpu[off])}")
        train_forward = bc.median(train_forward_ms[checkpointing])
        say(f"      step callback without a preview (loss, text line, progress bar): {off_callback:.2f} ms; "
            f"the training's UNet forward (batch {opts.batch}, with grad): {train_forward:.0f} ms")
        for every in opts.preview_every[1:]:
            key = (checkpointing, every)
            on_wall, on_cpu = bc.median(wall[key]), bc.median(cpu[key])
            in_span = spans[key][0][1]
            from_spans = (bc.median([span for span, _ in spans[key]]) - off_span) / in_span * 1000
            callback = bc.median(with_preview_ms[key]) - bc.median(without_preview_ms[key] or [off_callback])
            label = "the default" if every == default_every else ("worst case" if every == 1 else "")
            say(f"    preview_every {every:3d}{' (' + label + ')' if label else ''}: s/step wall "
                f"{bc.spread(wall[key])}")
            say(f"                                  cpu  {bc.spread(cpu[key])}")
            say(f"      previews per run (progress-bar hook / monitor.previews / expected): "
                f"{', '.join(counts[key])}; {in_span} in the timed span of {opts.steps - 1} steps")
            say(f"      preview/off = {on_wall / off_wall:.3f} wall, {on_cpu / off_cpu:.3f} cpu")
            say(f"      per preview: {from_spans:.0f} ms from the spans; {callback:.0f} ms measured in the step "
                f"callback (UNet batch-1 forward {bc.median(forward_ms[key]):.0f} ms, previewer decode "
                f"{bc.median(decode_ms[key]):.1f} ms; server JPEG encode {bc.median(encode_ms[key]):.1f} ms)")
        if default_every in opts.preview_every[1:]:
            key = (checkpointing, default_every)
            callback = bc.median(with_preview_ms[key]) - bc.median(without_preview_ms[key] or [off_callback])
            from_spans = (bc.median([span for span, _ in spans[key]]) - off_span) / spans[key][0][1] * 1000
            previews = len(expected_previews(default_steps, default_every))
            share = {"spans": previews * from_spans / 1000 / (default_steps * off_wall),
                     "callback": previews * callback / 1000 / (default_steps * off_wall)}
            say(f"    at the node's defaults ({default_steps} steps, preview_every {default_every}: {previews} "
                f"previews) with this model, batch and resolution, previews / training time:")
            for name, ms, label, note in (("spans", from_spans, "from the spans:        ", ""),
                                          ("callback", callback, "from the step callback:", "; contention-proof")):
                say(f"      {label} {previews} x {ms:.0f} ms / ({default_steps} x {off_wall:.3f} s) = "
                    f"{share[name] * 100:.2f} %   (target <= {TARGET * 100:.0f} %: {bc.verdict(share[name], TARGET)}"
                    f"{note})")
            verdicts.append(f"{row(checkpointing)}: {share['callback'] * 100:.2f} % (step callback), "
                            f"{share['spans'] * 100:.2f} % (spans)")
    if verdicts:
        say("  preview cost at the defaults: " + "; ".join(verdicts))
    say(f"  process peak RSS (ru_maxrss): {bc.process_peak_rss()}")
    say("=" * 78)


if __name__ == "__main__":
    main()
