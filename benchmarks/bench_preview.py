"""What the live preview of PerRes Train Residuals costs: preview_every 0 (off) vs 10 (the default) vs 1, on the
tests' random SD1.5 checkpoint (fp32), one row per gradient-checkpointing setting. Target: previews at the node's
defaults cost at most 3 % of training time. benchmarks/README.md, "bench_preview.py".

Run from the pack root:  python benchmarks/bench_preview.py [--resolution 128] [--batch 4] [--steps 10]
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import os
import struct
import sys
import types

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_common as bc  # noqa: E402
import harness as h  # noqa: E402

TARGET = 0.03  # the issue: cost at the defaults <= 3 % of training time
PREVIEW_METHODS = ("latent2rgb", "auto", "taesd")


def parse_args() -> argparse.Namespace:
    p = h.arguments(__doc__, resolution=128, batch=4, rounds=2)
    p.add_argument("--steps", type=int, default=10,
                   help="steps per node run; the first is warm-up, the rest are timed (default 10)")
    p.add_argument("--preview-every", default="0,10,1",
                   help="preview_every values to compare, comma-separated; the first must be 0 (off); default 0,10,1")
    p.add_argument("--checkpointing", default="on,off",
                   help="gradient checkpointing settings, one row each: on (the node's default), off, or on,off")
    p.add_argument("--preview-method", default="latent2rgb", choices=PREVIEW_METHODS,
                   help="ComfyUI's --preview-method for the run (its own default is none: no previews)")
    p.add_argument("--preview-size", type=int, default=0,
                   help="ComfyUI's --preview-size (the server resizes previews to it); 0 keeps the host's, 512")
    opts = p.parse_args()
    opts.checkpointing = [name == "on" for name in h.choices(p, "--checkpointing", opts.checkpointing, {"on", "off"})]
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
        args.preview_size = latent_preview.MAX_PREVIEW_RESOLUTION = size
    return f"{method.value} (ComfyUI's default: none), preview size {latent_preview.MAX_PREVIEW_RESOLUTION}"


class StepLog:
    """One node run, seen through wrappers installed for the benchmark process only (the pack is untouched): per
    call of the node's step callback its step, Measure and whether it made a preview; the previewers made; and
    the counts of previews (encoded as the server would, in the progress-bar hook) and text lines."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.calls: list[tuple[int, h.Measure, bool]] = []
        self.hook_previews = self.texts = 0
        self.previewers: set[str] = set()
        self.monitor_previews: list[int] = []

    def span(self, steps: int) -> tuple[float, float, int]:
        """Wall and CPU seconds from the end of step 1's callback to the end of step `steps`'s, and the
        previews in between."""
        by_step = {call[0]: call[1] for call in self.calls}
        first, last = by_step[1], by_step[steps]
        previews = sum(1 for step, _, previewed in self.calls if 1 < step <= steps and previewed)
        return last.wall_end - first.wall_end, last.cpu_end - first.cpu_end, previews

    def step_seconds(self) -> str:
        """Wall seconds from each step's callback end to the next's (a step and its callback), * after a preview."""
        calls = sorted(self.calls, key=lambda call: call[0])
        return " ".join(f"{b[1].wall_end - a[1].wall_end:.2f}{'*' if b[2] else ''}" for a, b in zip(calls, calls[1:]))

    def callback_ms(self, with_preview: bool) -> list[float]:
        """Wall milliseconds of the callbacks after the first step that did (or did not) preview."""
        return [run.seconds * 1000 for step, run, previewed in self.calls if step > 1 and previewed == with_preview]

    @contextlib.contextmanager
    def installed(self):
        """The wrappers: TrainingMonitor.__call__, latent_preview.get_previewer, the progress-bar hook and a
        stand-in PromptServer; all undone on exit."""
        import comfy.utils
        import latent_preview
        monitor_cls = bc.pack_module("nodes.train_monitor").TrainingMonitor
        original_call, original_get = monitor_cls.__call__, latent_preview.get_previewer

        def timed_call(monitor, step, loss, denoise):
            before = monitor.previews
            with h.Measure(memory=False) as run:
                original_call(monitor, step, loss, denoise)
            self.calls.append((step + 1, run, monitor.previews > before))
            if step + 1 == monitor.steps:
                self.monitor_previews.append(monitor.previews)

        def get_previewer(device, latent_format):
            previewer = original_get(device, latent_format)
            if previewer is not None:
                self.previewers.add(type(previewer).__name__)
            return previewer

        def progress(value, total, preview, node_id=None):
            if preview is not None:
                server_encode(preview)  # part of a preview's cost
                self.hook_previews += 1

        previous_hook = comfy.utils.PROGRESS_BAR_HOOK
        monitor_cls.__call__, latent_preview.get_previewer = timed_call, get_previewer
        comfy.utils.set_progress_bar_global_hook(progress)
        undo_server = stand_in_server(self)
        try:
            yield self
        finally:
            undo_server()
            comfy.utils.set_progress_bar_global_hook(previous_hook)
            monitor_cls.__call__, latent_preview.get_previewer = original_call, original_get


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
            node = str(node_id).encode("utf-8")
            # packed as send_progress_text packs it (its cost), then dropped: nothing listens in-process
            struct.pack(">I", len(node)) + node + (text.encode("utf-8") if isinstance(text, str) else text)
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
    text line goes to the server as in ComfyUI; every input as a list (is_input_list), in inference mode. Also
    the node's defaults, by input."""
    import nodes
    import torch
    from comfy_api.latest import _io

    cls = nodes.NODE_CLASS_MAPPINGS["PerResTrainResiduals"]
    clone = type(cls.__name__, (cls,), {})
    clone.hidden = _io.HiddenHolder.from_dict({_io.Hidden.unique_id: "bench"})

    def run(**inputs):
        with torch.inference_mode():
            return clone.execute(**{name: [value] for name, value in inputs.items()})
    return run, {getattr(item, "id", None): getattr(item, "default", None) for item in cls.define_schema().inputs}


class Collected:
    """What the StepLog of each timed run adds: lists keyed by (checkpointing, preview_every)."""

    LISTS = ("wall", "cpu", "spans", "with_preview_ms", "without_preview_ms", "counts")

    def __init__(self) -> None:
        for name in self.LISTS:
            setattr(self, name, collections.defaultdict(list))
        self.texts: list[int] = []
        self.previewers: set[str] = set()
        self.problems: list[str] = []

    def add(self, log: StepLog, key: tuple, steps: int, run: h.Measure) -> str:
        checkpointing, every = key
        span_wall, span_cpu, in_span = log.span(steps)
        self.wall[key].append(span_wall / (steps - 1))
        self.cpu[key].append(span_cpu / (steps - 1))
        self.spans[key].append((span_wall, in_span))
        self.with_preview_ms[key].extend(log.callback_ms(True))
        self.without_preview_ms[key].extend(log.callback_ms(False))
        expected = len(expected_previews(steps, every))
        monitor = log.monitor_previews[-1] if log.monitor_previews else "?"
        self.counts[key].append(f"{log.hook_previews}/{monitor}/{expected}")
        self.texts.append(log.texts)
        self.previewers |= log.previewers
        where = f"{h.row(checkpointing)}, preview_every {every}, run {len(self.counts[key])}"
        if log.hook_previews != expected or monitor != expected:
            self.problems.append(f"{where}: {log.hook_previews} previews reached the progress bar, "
                                 f"monitor.previews {monitor}, expected {expected}")
        if log.texts != steps:
            self.problems.append(f"{where}: {log.texts} text lines for {steps} steps")
        return (f"s/step wall {span_wall / (steps - 1):.3f} cpu {span_cpu / (steps - 1):.3f} ({in_span} preview(s) "
                f"in the timed span; previews hook/monitor/expected {self.counts[key][-1]}); steps 2.. "
                f"{log.step_seconds()}")

    def per_preview_ms(self, key: tuple, off: tuple) -> tuple[float, float]:
        """Milliseconds per preview from the spans ((preview run - off run) / previews in the span) and from the
        step callback (with a preview - without)."""
        off_span = h.median([span for span, _ in self.spans[off]])
        from_spans = (h.median([span for span, _ in self.spans[key]]) - off_span) / self.spans[key][0][1] * 1000
        without = self.without_preview_ms[key] or [h.median(self.without_preview_ms[off])]
        return from_spans, h.median(self.with_preview_ms[key]) - h.median(without)


def main() -> None:
    opts = parse_args()
    model, clip, vae = bc.load_model("sd15", opts.device, opts.threads)
    say = h.say
    method = set_preview_method(opts.preview_method, opts.preview_size)
    images = bc.make_images(opts.batch, opts.resolution)
    node, defaults = train_node_with_id()
    default_steps, default_every = defaults["steps"], defaults["preview_every"]
    say(f"model dtype {model.model.get_dtype()}, load device {model.load_device}; images {tuple(images.shape)}; "
        f"preview method {method}")
    say(f"settings: resolution {opts.resolution}, batch {opts.batch}, {opts.steps} steps per run (1 warm-up), "
        f"preview_every {opts.preview_every} x {opts.rounds} rounds, fp32, device {opts.device}; {h.load_note()}")

    def run(steps: int, every: int, checkpointing: bool, seed: int):
        return bc.train_perres(model, clip, vae, images, steps, opts.batch, opts.resolution, seed, node=node,
                               gradient_checkpointing=checkpointing, preview_every=every)

    log, found = StepLog(), Collected()
    with log.installed():
        for checkpointing in opts.checkpointing:
            log.reset()
            seconds, _ = h.measured(lambda: run(3, max(opts.preview_every), checkpointing, seed=99))  # warm-up
            say(f"[{h.row(checkpointing)}] warm-up run (3 steps, preview_every {max(opts.preview_every)}): "
                f"{seconds:.2f} s, {log.hook_previews} previews")
            rounds = {every: 0 for every in opts.preview_every}

            def config(every: int, checkpointing: bool = checkpointing):
                def timed_run():
                    log.reset()
                    rounds[every] += 1  # the round's seed, as before
                    return run(opts.steps, every, checkpointing, seed=rounds[every] - 1)
                return timed_run

            h.interleaved({f"every {every}": config(every) for every in opts.preview_every}, opts.rounds,
                          warmup=False, label=h.row(checkpointing),
                          after=lambda name, m, c=checkpointing: found.add(log, (c, int(name.split()[1])),
                                                                           opts.steps, m))

    record = h.Record("bench_preview", opts, "per training step, PerResTrainResiduals with previews off "
                      "(preview_every 0) vs on, one row per gradient-checkpointing setting", opts.device,
                      note=f"{opts.resolution} px, batch {opts.batch}, {opts.steps} steps per run")
    say(f"  preview method set to {method}; previewer used: {', '.join(sorted(found.previewers)) or 'NONE'}")
    say(f"  previews are encoded as the server would (JPEG q95 at the preview size) in the progress-bar hook; "
        f"text lines sent: {sorted(set(found.texts))} per run")
    if found.problems or not found.previewers:
        say("  PREVIEW COUNT PROBLEMS: " + ("; ".join(found.problems) or "no previewer was created"))
    for checkpointing in opts.checkpointing:
        off = (checkpointing, 0)
        off_wall = h.median(found.wall[off])
        say(f"  -- {h.row(checkpointing)}: step callback without a preview (loss, text line, progress bar) "
            f"{h.median(found.without_preview_ms[off]):.2f} ms")
        for every in opts.preview_every:
            key = (checkpointing, every)
            label = {0: " (off)", default_every: " (the default)", 1: " (worst case)"}.get(every, "")
            say(f"    preview_every {every}{label}: s/step wall {h.spread(found.wall[key])}; "
                f"cpu {h.spread(found.cpu[key])}")
            if every:
                from_spans, callback = found.per_preview_ms(key, off)
                say(f"      previews per run (progress-bar hook / monitor.previews / expected) "
                    f"{', '.join(found.counts[key])}, {found.spans[key][0][1]} in the timed span of {opts.steps - 1} "
                    f"steps; preview/off {h.median(found.wall[key]) / off_wall:.3f} wall, "
                    f"{h.median(found.cpu[key]) / h.median(found.cpu[off]):.3f} cpu; per preview {from_spans:.0f} ms "
                    f"from the spans, {callback:.0f} ms in the step callback (forward, decode, server encode)")
        if default_every in opts.preview_every[1:]:
            from_spans, callback = found.per_preview_ms((checkpointing, default_every), off)
            previews = len(expected_previews(default_steps, default_every))
            say(f"    at the node's defaults ({default_steps} steps, preview_every {default_every}: {previews} "
                f"previews) with this model, batch and resolution, previews / training time:")
            for name, ms in (("spans", from_spans), ("step callback", callback)):
                share = previews * ms / 1000 / (default_steps * off_wall)
                proof = "; contention-proof" if "call" in name else ""
                record.ratio(f"preview share, {h.row(checkpointing)}, from the {name}", share, TARGET,
                             f"live preview's share of training time at the node's defaults, {h.row(checkpointing)}, "
                             f"from the {name}", detail=f"= {share * 100:.2f} % ({previews} x {ms:.0f} ms / "
                                                        f"({default_steps} x {off_wall:.3f} s){proof})")
    record.figure("preview_count_problems", found.problems)
    say(f"  process peak RSS (ru_maxrss): {h.process_peak_rss()}")
    record.finish(opts.json)


if __name__ == "__main__":
    main()
