"""Cost of PerRes Suggest Class Word next to one 150-step training run, in one run.

Same model (the tests' random-weight SD1.5, fp32), the same 5 images, the same resolution: the
suggester with its defaults (the default candidate list, budget 12, seed 0), and PerRes Train Residuals
(batch 4, its defaults otherwise) for --train-steps steps, extrapolated per step to 150 (after one
untimed warm-up run of each). Prints both times and their ratio.

Run from the pack root:  python benchmarks/bench_suggest.py [--resolution 64] [--train-steps 10]
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
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--threads", type=int, default=0)
    opts = p.parse_args()
    model, clip, vae = bc.load_sd15(opts.device, opts.threads)
    images = make_images(opts.images, opts.resolution)
    class_words = bc.pack_module("perres_core.class_words")

    def suggest():
        return bc.run_node("PerResSuggestClassWord", model=model, clip=clip, vae=vae, images=images,
                           candidates=class_words.DEFAULT_CANDIDATE_TEXT, budget=class_words.DEFAULT_BUDGET,
                           seed=0, resolution=opts.resolution)

    def train(steps: int):
        return bc.run_node("PerResTrainResiduals", model=model, clip=clip, vae=vae, images=images, identifier="sks",
                           class_word="dog", steps=steps, batch_size=4, learning_rate=1e-3, rank_ratio=0.05,
                           resolution=opts.resolution, seed=0, init="random")

    train(2)                                   # warm-up: load, allocator
    two, _ = bc.timed(lambda: train(2))
    many, _ = bc.timed(lambda: train(opts.train_steps + 2))
    per_step = (many - two) / opts.train_steps  # setup (VAE encoding, load) cancels out
    training_150 = two + per_step * 148
    suggest()                                  # warm-up
    seconds, result = bc.timed(suggest)
    words = len(class_words.parse_candidates(class_words.DEFAULT_CANDIDATE_TEXT))
    bc.say("=" * 78)
    bc.say(f"SUGGEST CLASS WORD  {opts.resolution}px  {opts.images} images  {words} candidates  budget "
           f"{class_words.DEFAULT_BUDGET}  device {opts.device}; {bc.load_note()}")
    bc.say(f"  suggester (defaults)          {seconds:8.1f} s   (best: {result[0]})")
    bc.say(f"  training, 150 steps, batch 4  {training_150:8.1f} s   ({per_step:.2f} s/step, extrapolated)")
    bc.say(f"  suggester / training = {seconds / training_150:.3f}")
    bc.say("=" * 78)


if __name__ == "__main__":
    main()
