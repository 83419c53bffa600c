"""Cost of PerRes Suggest Class Word next to one 150-step training run, in one run.

Same model (the tests' random SD1.5, fp32), 5 images and resolution: the suggester with its defaults vs PerRes
Train Residuals (batch 4) timed at 2 and 2 + --train-steps steps, extrapolated to 150. --sample-words N
--sample-budget B times a smaller ranking and extrapolates its time per noise prediction to the defaults' count.

Run from the pack root:  python benchmarks/bench_suggest.py [--resolution 64] [--train-steps 10]
                         python benchmarks/bench_suggest.py --resolution 512 --train-steps 3 \\
                             --sample-words 5 --sample-budget 2
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_common as bc  # noqa: E402
import harness as h  # noqa: E402


def main() -> None:
    p = h.arguments(__doc__, resolution=64, images=5, train_steps=10)
    p.add_argument("--sample-words", type=int, default=0, help="rank only the first N default candidates")
    p.add_argument("--sample-budget", type=int, default=0, help="with --sample-words: the budget of that ranking")
    opts = p.parse_args()
    model, clip, vae = bc.load_model("sd15", opts.device, opts.threads)
    images = bc.make_images(opts.images, opts.resolution)
    class_words = bc.pack_module("perres_core.class_words")
    defaults = list(class_words.DEFAULT_CANDIDATES)
    words = defaults[:opts.sample_words] if opts.sample_words else defaults
    budget = opts.sample_budget if opts.sample_words and opts.sample_budget else class_words.DEFAULT_BUDGET

    def suggest(candidates: list[str], budget: int):
        return bc.run_node("PerResSuggestClassWord", model=model, clip=clip, vae=vae, images=images,
                           candidates=", ".join(candidates), budget=budget, seed=0, resolution=opts.resolution)

    def train(steps: int):
        return bc.train_perres(model, clip, vae, images, steps, 4, opts.resolution)

    train(1)                                   # warm-up: load, allocator
    two, _ = h.measured(lambda: train(2))
    many, _ = h.measured(lambda: train(opts.train_steps + 2))
    per_step = (many - two) / opts.train_steps  # setup (VAE encoding, load) cancels out
    training_150 = two + per_step * 148
    suggest(words[:2], 1)                      # warm-up
    seconds, result = h.measured(lambda: suggest(words, budget))
    timed_count = class_words.evaluation_count(len(words), opts.images, budget)
    default_count = class_words.evaluation_count(len(defaults), opts.images, class_words.DEFAULT_BUDGET)
    default_seconds = seconds / timed_count * default_count
    record = h.Record("bench_suggest", opts, "Suggest Class Word with its defaults vs one 150-step training",
                      opts.device, note=f"{opts.resolution} px, {opts.images} images")
    h.say(f"SUGGEST CLASS WORD  {opts.resolution}px  {opts.images} images  {len(defaults)} candidates  budget "
          f"{class_words.DEFAULT_BUDGET}")
    if words is not defaults:
        h.say(f"  timed: {len(words)} words, budget {budget}: {timed_count} noise predictions in {seconds:.1f} s, "
              f"extrapolated to the defaults' {default_count}")
    h.say(f"  suggester (defaults)          {default_seconds:8.1f} s   (best of the timed run: {result[0]})")
    h.say(f"  training, 150 steps, batch 4  {training_150:8.1f} s   ({per_step:.2f} s/step, extrapolated)")
    record.ratio("suggester/training", default_seconds / training_150, 1, "Suggest Class Word (defaults) / "
                 "150-step training", compare="<", detail=f"({default_seconds:.0f} vs {training_150:.0f} s)")
    record.figure("suggester_seconds", default_seconds)
    record.figure("training_150_steps_seconds", training_150)
    record.finish(opts.json)

if __name__ == "__main__":
    main()
