"""The one timing harness of the benchmarks and gpu_check.py (benchmarks/README.md, "One harness, one record per
run"): clocks, peak memory, interleaved repeats with medians, and the Record every benchmark prints and writes."""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import logging
import os
import resource
import statistics
import sys
import threading
import time
from typing import Any, Callable, Iterator, Optional

log = logging.getLogger("perres.bench")
GIB = 1024 ** 3
SCHEMA = "perres-benchmark/1"


def say(text: str = "") -> None:
    """One line of a benchmark's output on stdout (the summary blocks are what run_all.sh collects)."""
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


NUMBER_HELP = {"resolution": "image side in px (latent = /8)", "batch": "images per step", "repeats":
               "timed runs per config, interleaved", "rounds": "timed rounds, interleaved", "steps": "steps per run"}


def arguments(doc: str, device: str = "cpu", json_default: Optional[str] = None, threads: bool = True,
              profile: bool = False, **numbers: float) -> argparse.ArgumentParser:
    """The command line every benchmark starts from: its docstring as help, --device, --threads and --json, with
    --profile FILE, and a numeric option per keyword (`resolution=128` is --resolution, an int, default 128)."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default=device, choices=["cpu", "cuda"])
    if threads:
        p.add_argument("--threads", type=int, default=0,
                       help="torch.set_num_threads (0 = leave torch's default; 1 on a machine shared with other jobs)")
    p.add_argument("--json", metavar="FILE", default=json_default,
                   help=f"where to write the record (default {json_default or 'bench_out/<ComfyUI version>/<script>'})")
    if profile:
        p.add_argument("--profile", metavar="FILE", default=None,
                       help="also profile one extra run with cProfile and write the stats to FILE")
    for name, default in numbers.items():
        p.add_argument(f"--{name.replace('_', '-')}", type=type(default), default=default,
                       help=f"{NUMBER_HELP.get(name, name.replace('_', ' '))}; default {default}")
    return p


def choices(p: argparse.ArgumentParser, flag: str, text: str, allowed: set[str]) -> list[str]:
    """A comma-separated option's items, each one of `allowed` (p.error otherwise)."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names or set(names) - allowed:
        p.error(f"{flag} takes {', '.join(sorted(allowed))} (comma-separated); got {text!r}")
    return names


def profiled(run: Callable[[], Any], path: str, sort: str) -> None:
    """One extra run under cProfile: stats written to `path`, the top 25 by `sort` printed (--profile)."""
    import cProfile
    import pstats
    profiler = cProfile.Profile()
    profiler.enable()
    run()
    profiler.disable()
    profiler.dump_stats(path)
    pstats.Stats(profiler).sort_stats(sort).print_stats(25)


def row(checkpointing: bool) -> str:
    """The name of a gradient-checkpointing row of the training benchmarks."""
    return f"checkpointing {'on' if checkpointing else 'off'}"


def cuda_active() -> bool:
    """True once this process uses a CUDA device (the benchmarks never initialise CUDA on the CPU)."""
    import torch
    return torch.cuda.is_available() and torch.cuda.is_initialized()


def sync() -> None:
    import torch
    if cuda_active():
        torch.cuda.synchronize()


def cpu_time() -> float:
    """CPU seconds of this thread when torch runs single-threaded (every op runs there), else of the process:
    other processes competing for the cores disturb it far less than wall time."""
    import torch
    return time.thread_time() if torch.get_num_threads() == 1 else time.process_time()


def rss_bytes() -> int:
    import psutil
    return psutil.Process().memory_info().rss


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def spread(values: list[float]) -> str:
    if not values:
        return "n/a"
    return f"median {median(values):.3f} s (min {min(values):.3f}, max {max(values):.3f}, n={len(values)})"


def gib(num_bytes: Optional[float]) -> str:
    return "n/a" if num_bytes is None else f"{num_bytes / GIB:.2f} GiB"


def process_peak_rss() -> str:
    """ru_maxrss of the whole process (kB on Linux)."""
    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2:.2f} GiB"


def load_note() -> str:
    """The 1-minute load average against the core count, to flag a busy machine in the output."""
    try:
        load = os.getloadavg()[0]
    except OSError:
        return "load average unknown"
    cores = os.cpu_count() or 1
    busy = " (BUSY: other processes compete for the cores; trust the CPU-time ratios more)" \
        if load > cores + 0.5 else ""
    return f"load average {load:.2f} on {cores} cores{busy}"


class Measure:
    """Wall and CPU seconds and peak memory (CUDA's allocator peak, else the resident set sampled every
    `interval` seconds by a thread; memory=False leaves that out) of the block it wraps."""

    def __init__(self, memory: bool = True, interval: float = 0.02) -> None:
        self.memory, self.interval = memory, interval
        self.seconds = self.cpu_seconds = 0.0
        self.start_rss = self.peak_rss = 0
        self.cuda_peak: Optional[int] = None
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def _poll(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak_rss = max(self.peak_rss, rss_bytes())

    def __enter__(self) -> "Measure":
        import torch
        if cuda_active():
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        if self.memory:
            self.start_rss = self.peak_rss = rss_bytes()
            self._thread = threading.Thread(target=self._poll, daemon=True)
            self._thread.start()
        self.wall_start, self.cpu_start = time.perf_counter(), cpu_time()
        return self

    def __exit__(self, *exc) -> None:
        import torch
        sync()
        self.wall_end, self.cpu_end = time.perf_counter(), cpu_time()
        self.seconds, self.cpu_seconds = self.wall_end - self.wall_start, self.cpu_end - self.cpu_start
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self.peak_rss = max(self.peak_rss, rss_bytes())
        if cuda_active():
            self.cuda_peak = torch.cuda.max_memory_allocated()

    @property
    def peak(self) -> int:
        """CUDA's allocator peak where there is one, else the process's peak resident set."""
        return self.cuda_peak if self.cuda_peak is not None else self.peak_rss

    def describe(self) -> str:
        text = f"peak RSS {gib(self.peak_rss)} (+{gib(self.peak_rss - self.start_rss)} in phase)" if self.memory \
            else ""
        if self.cuda_peak is not None:
            text += f"{', ' if text else ''}peak CUDA allocated {gib(self.cuda_peak)}"
        return text


def measured(fn: Callable[[], Any]) -> tuple[float, Any]:
    """(wall seconds, result) of fn(), time only."""
    with Measure(memory=False) as m:
        out = fn()
    return m.seconds, out


class StepClock:
    """Wall-clock and CPU timestamps of events (optimizer or sampler steps); durations are between ticks."""

    def __init__(self) -> None:
        self.stamps: list[tuple[float, float]] = []

    def tick(self, *_args, **_kwargs) -> None:
        sync()
        self.stamps.append((time.perf_counter(), cpu_time()))

    def reset(self) -> None:
        self.stamps.clear()

    def durations(self, cpu: bool = False) -> list[float]:
        return [b[cpu] - a[cpu] for a, b in zip(self.stamps, self.stamps[1:])]

    def cpu_durations(self) -> list[float]:
        return self.durations(cpu=True)


@contextlib.contextmanager
def removing(*handles) -> Iterator[None]:
    """Remove the hooks of `handles` (module or optimizer hooks) when the block ends."""
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def optimizer_steps(clock: StepClock) -> contextlib.AbstractContextManager:
    """Tick `clock` after every torch optimizer step in the process (PerRes, the bound and the stock node alike)."""
    from torch.optim.optimizer import register_optimizer_step_post_hook
    return removing(register_optimizer_step_post_hook(clock.tick))


@contextlib.contextmanager
def progress_steps(clock: StepClock) -> Iterator[None]:
    """Tick `clock` on every comfy.utils.ProgressBar update (KSampler calls it once per sampling step)."""
    import comfy.utils
    previous = comfy.utils.PROGRESS_BAR_HOOK
    comfy.utils.set_progress_bar_global_hook(lambda value, total, preview, node_id=None: clock.tick())
    try:
        yield
    finally:
        comfy.utils.set_progress_bar_global_hook(previous)


@dataclasses.dataclass
class Series:
    """The runs of one config: per-step wall and CPU seconds, run totals, the untimed warm-up's Measure, output."""
    steps: list[float] = dataclasses.field(default_factory=list)
    cpu_steps: list[float] = dataclasses.field(default_factory=list)
    totals: list[float] = dataclasses.field(default_factory=list)
    before: list[float] = dataclasses.field(default_factory=list)
    warmup: Optional[Measure] = None
    output: Any = None

    @property
    def step(self) -> float:
        return median(self.steps)

    @property
    def cpu_step(self) -> float:
        return median(self.cpu_steps)

    def describe(self, name: str, width: int = 6) -> None:
        """Print the per-step spreads (wall, cpu) and, where kept, the run totals and the untimed loads."""
        pad = " " * (width + 3)
        say(f"  {name:{width}s} s/step wall: {spread(self.steps)}")
        say(f"{pad}s/step cpu:  {spread(self.cpu_steps)}")
        if self.before:
            say(f"{pad}run total:   {spread(self.totals)}")
            say(f"{pad}load/switch before the run (untimed above): {spread(self.before)}")


def interleaved(configs: dict[str, Callable[[], Any]], repeats: int, clock: Optional[StepClock] = None,
                before: Optional[Callable[[str], Any]] = None, after: Optional[Callable[[str, Measure], str]] = None,
                warmup: bool = True, label: str = "", memory: bool = False) -> dict[str, Series]:
    """Each config once untimed (its peak memory measured), then `repeats` rounds in an order rotated each round,
    so drifting load favours none. `before(name)` runs untimed before every run (its seconds kept); `after(name,
    measure)` collects what else a run gives and returns text for its log line; `memory` samples timed runs too."""
    series = {name: Series() for name in configs}
    names = list(configs)
    prefix = f"{label}, " if label else ""
    if warmup:
        for name, run in configs.items():
            if before is not None:
                before(name)
            with Measure() as m:
                series[name].output = run()
            series[name].warmup = m
            say(f"[{prefix}warm-up] {name:8s} {m.seconds:.2f} s; {m.describe()}")
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            entry = series[name]
            if before is not None:
                entry.before.append(measured(lambda: before(name))[0])
            if clock is not None:
                clock.reset()
            with Measure(memory=memory) as m:
                output = configs[name]()
            if entry.output is None:
                entry.output = output
            entry.totals.append(m.seconds)
            note = after(name, m) if after is not None else ""
            steps = ""
            if clock is not None:
                entry.steps += clock.durations()
                entry.cpu_steps += clock.cpu_durations()
                steps = (f"; s/step wall {' '.join(f'{d:.3f}' for d in clock.durations())} | cpu "
                         f"{' '.join(f'{d:.3f}' for d in clock.cpu_durations())}")
            say(f"[{prefix}round {r + 1}] {name:8s} total {m.seconds:.2f} s{steps}{'  ' + note if note else ''}")
    return series


def device_name(device: str) -> str:
    """The accelerator's name, or the CPU's model and core count."""
    import torch
    if device == "cuda":
        return torch.cuda.get_device_name()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            model = next((line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")), "")
    except OSError:
        model = ""
    return f"CPU{' (' + model + ')' if model else ''}, {os.cpu_count()} cores"


def today() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")


def host_info(device: str) -> dict[str, Any]:
    """What a record says of the machine and the host in this process."""
    import torch
    from bench_common import comfy_version, dynamic_vram_state
    return {"comfyui": comfy_version(""), "torch": torch.__version__, "device": device_name(device),
            "torch_threads": torch.get_num_threads(), "dynamic_vram": dynamic_vram_state(), "load": load_note()}


def verdict(value: float, target: float, compare: str = "<=") -> str:
    ok = {"<=": value <= target, "<": value < target, ">=": value >= target}[compare]
    return "OK" if ok else ("OVER TARGET" if compare.startswith("<") else "UNDER TARGET")


class Record:
    """What one run of a benchmark measured: printed as its summary (between two rules of '=') and written as
    JSON (docs/figures/README.md); a family other than sd15 is named in the benchmark, `-<family>`."""

    def __init__(self, benchmark: str, opts, compares: str, device: str = "cpu", note: str = "",
                 family: str = "sd15") -> None:
        self.default_path = default_json(benchmark, family)
        benchmark = benchmark if family == "sd15" else f"{benchmark}-{family}"
        settings = {k: v for k, v in sorted(vars(opts).items()) if k != "json"}
        self.data: dict[str, Any] = {
            "schema": SCHEMA, "benchmark": benchmark, "source": "measured", "date": today(), "host": host_info(device),
            "settings": json.loads(json.dumps(settings, default=str)), "note": note, "compares": compares,
            "ratios": {}, "figures": {}}
        say("")
        say("=" * 78)
        host = self.data["host"]
        say(f"  host: ComfyUI {host['comfyui']}, torch {host['torch']}, {host['device']}, {host['torch_threads']} "
            f"threads, dynamic VRAM {host['dynamic_vram']}; {host['load']}")
        say("  settings: " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in settings.items()))
        say(f"  compares: {compares}")

    def ratio(self, key: str, value: Optional[float], target: float, label: str, compare: str = "<=",
              detail: str = "", note: str = "") -> None:
        """One ratio against its target: printed as `key = value detail (target ...)`, kept for the JSON.
        `label` names it in the docs' tables; `note` stands in the table where there is no value."""
        self.data["ratios"][key] = {"label": label, "value": value, "target": target, "compare": compare,
                                    "detail": detail, "note": note}
        if value is None:
            say(f"  {key} = n/a  ({note or 'not measured'})")
        else:
            say(f"  {key} = {value:.3f}{' ' + detail if detail else ''}   "
                f"(target {compare} {target}: {verdict(value, target, compare)})")

    def figure(self, key: str, value: Any) -> None:
        self.data["figures"][key] = value

    def figures(self, **figures: Any) -> None:
        self.data["figures"].update(figures)

    def finish(self, path: Optional[str] = None) -> None:
        """Close the summary and write the JSON to `path` (default bench_out/...)."""
        say("=" * 78)
        path = path or self.default_path
        write_json(path, self.data)
        say(f"wrote {path}")


def write_json(path: str, data: Any) -> None:
    """Write `data` to `path` whole or not at all (a run cut short leaves the previous file), folders made."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(f"{path}.tmp", "w", encoding="utf-8") as handle:
        json.dump(data, handle, indent=2, default=str)
        handle.write("\n")
    os.replace(f"{path}.tmp", path)


def default_json(benchmark: str, family: str = "sd15") -> str:
    """bench_out/<ComfyUI version>/<benchmark>[-<family>].json in the pack (ignored by git; run_all.sh's folder)."""
    from bench_common import PACK_DIR, comfy_version
    name = benchmark if family == "sd15" else f"{benchmark}-{family}"
    return os.path.join(PACK_DIR, "bench_out", comfy_version(""), f"{name}.json")


class TrainingPeak(Measure):
    """Peak memory of the training steps alone (activations, gradients, optimizer state): above what was in
    use when `unet` first ran, so the loaded model, latents and a node's VAE encoding are left out. CUDA's
    allocator peak, else the resident set sampled every 5 ms."""

    def __init__(self, unet) -> None:
        super().__init__(interval=0.005)
        self.unet, self.baseline, self._handle = unet, None, None

    def _on_first_forward(self, *_args) -> None:
        import torch
        if self.baseline is not None:
            return
        if cuda_active():
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.baseline = torch.cuda.memory_allocated()
        else:
            self.baseline = self.peak_rss = rss_bytes()

    def __enter__(self) -> "TrainingPeak":
        self._handle = self.unet.register_forward_pre_hook(self._on_first_forward)
        super().__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._handle.remove()
        super().__exit__(*exc)

    @property
    def extra_bytes(self) -> int:
        return 0 if self.baseline is None else max(0, self.peak - self.baseline)
