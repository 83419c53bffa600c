"""Cost of PerRes Suggest Class Word next to one 150-step training run, in one run.

Same model (the tests' random-weight SD1.5, fp32), the same 5 images, the same resolution: the
suggester with its defaults (the default candidate list, budget 12, seed 0), and PerRes Train Residuals
(batch 4, its defaults otherwise) for --train-steps steps, extrapolated per step to 150 (after one
untimed warm-up run of each). Prints both times and their ratio.

At large resolutions a whole default ranking takes long on a CPU: --sample-words N --sample-budget B
times a ranking of the first N default candidates with budget B instead and extrapolates its time per
noise prediction to the default ranking's count (perres_core.class_words.evaluation_count).

Run from the pack root:  python benchmarks/bench_suggest.py [--resolution 64] [--train-steps 10]
                         python benchmarks/bench_suggest.py --resolution 512 --train-steps 3 \\
                             --sample-words 5 --sample-budget 2
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_common as bc  # noqa: E402
from bench_training import make_images  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--images", type=int, default=5)
    p.add_argument("--train-steps", type=int, default=10)
    p.add_argument("--sample-words", type=int, default=0, help="rank only the first N default candidates")
    p.add_argument("--sample-budget", type=int, default=0, help="with --sample-words: the budget of that ranking")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--threads", type=int, default=0)
    opts = p.parse_args()
    model, clip, vae = bc.load_sd15(opts.device, opts.threads)
    images = make_images(opts.images, opts.resolution)
    class_words = bc.pack_module("perres_core.class_words")
    defaults = list(class_words.DEFAULT_CANDIDATES)
    words = defaults[:opts.sample_words] if opts.sample_words else defaults
    budget = opts.sample_budget if opts.sample_words and opts.sample_budget else class_words.DEFAULT_BUDGET

    def suggest(candidates: list[str], budget: int):
        return bc.run_node("PerResSuggestClassWord", model=model, clip=clip, vae=vae, images=images,
                           candidates=", ".join(candidates), budget=budget, seed=0, resolution=opts.resolution)

    def train(steps: int):
        return bc.run_node("PerResTrainResiduals", model=model, clip=clip, vae=vae, images=images, identifier="sks",
                           class_word="dog", steps=steps, batch_size=4, learning_rate=1e-3, rank_ratio=0.05,
                           resolution=opts.resolution, seed=0, init="random")

    train(1)                                   # warm-up: load, allocator
    two, _ = bc.timed(lambda: train(2))
    many, _ = bc.timed(lambda: train(opts.train_steps + 2))
    per_step = (many - two) / opts.train_steps  # setup (VAE encoding, load) cancels out
    training_150 = two + per_step * 148
    suggest(words[:2], 1)                      # warm-up
    seconds, result = bc.timed(lambda: suggest(words, budget))
    timed_count = class_words.evaluation_count(len(words), opts.images, budget)
    default_count = class_words.evaluation_count(len(defaults), opts.images, class_words.DEFAULT_BUDGET)
    default_seconds = seconds / timed_count * default_count
    bc.say("=" * 78)
    bc.say_settings(opts, "Suggest Class Word with its defaults vs one 150-step training")
    bc.say(f"SUGGEST CLASS WORD  {opts.resolution}px  {opts.images} images  {len(defaults)} candidates  budget "
           f"{class_words.DEFAULT_BUDGET}  device {opts.device}; {bc.load_note()}")
    if words is not defaults:
        bc.say(f"  timed: {len(words)} words, budget {budget}: {timed_count} noise predictions in {seconds:.1f} s, "
               f"extrapolated to the defaults' {default_count}")
    bc.say(f"  suggester (defaults)          {default_seconds:8.1f} s   (best of the timed run: {result[0]})")
    bc.say(f"  training, 150 steps, batch 4  {training_150:8.1f} s   ({per_step:.2f} s/step, extrapolated)")
    bc.say(f"  suggester / training = {default_seconds / training_150:.3f}")
    bc.say("=" * 78)


if __name__ == "__main__":
    main()
