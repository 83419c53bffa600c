"""Batch personalization: train one PerRes residual per concept folder on running ComfyUI servers.

    python tools/perres_batch.py CONCEPTS --server http://127.0.0.1:8188 [--server URL ...] \\
        --checkpoint v1-5-pruned-emaonly.safetensors [--prefix perres] [--set steps=150 ...]

CONCEPTS holds one folder of images per concept, each with an optional concept.json
({"identifier": "sks", "class_word": "dog", "steps": 150, ...}). Each concept's images are uploaded to a
server, trained with the training part of example_workflows/api/perres_train_and_sample.json and saved
there as models/loras/<prefix>/<concept>_00001.safetensors. The manifest (default CONCEPTS/perres_manifest.json)
records concept → file, final loss and seconds after every concept; a rerun skips the concepts whose file
a server still has. Exit status: 0 all trained, 1 some failed or unfinished, 2 bad arguments or concepts.
Run it with ComfyUI's Python (it needs aiohttp and tqdm, which ComfyUI installs).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from typing import Any

from tqdm.contrib.logging import logging_redirect_tqdm

from batch_concepts import ConceptError, find_concepts, load_workflow, train_settings, training_prompt
from batch_run import Outcome, run_batch


def _setting(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got '{text}'")
    try:
        return key, json.loads(value)  # numbers and true/false as JSON; anything else stays a string
    except ValueError:
        return key, value


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="perres_batch", description=__doc__.split("\n\n")[0])
    parser.add_argument("concepts", help="folder with one subfolder of images per concept")
    parser.add_argument("--server", action="append", required=True, metavar="URL",
                        help="a running ComfyUI with PerRes, e.g. http://127.0.0.1:8188 (repeat for several)")
    parser.add_argument("--checkpoint", required=True, help="SD1.x checkpoint name as the servers list it")
    parser.add_argument("--prefix", default="perres", help="folder under models/loras for the residuals")
    parser.add_argument("--set", type=_setting, action="append", default=[], metavar="KEY=VALUE",
                        help="a PerRes Train Residuals setting for every concept (concept.json overrides it)")
    parser.add_argument("--manifest", help="manifest file (default: CONCEPTS/perres_manifest.json)")
    parser.add_argument("--workflow", help="API-format workflow to take the training nodes from")
    parser.add_argument("--timeout", type=float, default=3600.0,
                        help="seconds one concept may take on a server before it counts as gone")
    return parser.parse_args(argv)


def report(outcome: Outcome, manifest_path: str) -> None:
    """The results table and what is missing, on the terminal."""
    for name, entry in sorted(outcome.manifest.items()):
        loss = "-" if entry["final_loss"] is None else f"{entry['final_loss']:.4f}"
        state = "skipped" if name in outcome.skipped else "trained" if name in outcome.trained else "earlier"
        print(f"{name:24} {state:8} {entry['file']:40} loss {loss:>8} {entry['seconds']:8.1f} s  {entry['server']}")
    for name, message in sorted(outcome.failed.items()):
        print(f"{name:24} FAILED   {message}")
    for url, why in sorted(outcome.lost_servers.items()):
        print(f"server lost: {url}: {why}")
    if outcome.unfinished:
        done = sorted(outcome.manifest)
        print(f"No server left: {len(outcome.unfinished)} concept(s) not trained: {', '.join(outcome.unfinished)}. "
              f"Finished: {', '.join(done) or 'none'}. Rerun with a working --server to train the rest.")
    print(f"manifest: {manifest_path}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    manifest_path = args.manifest or os.path.join(args.concepts, "perres_manifest.json")
    try:
        workflow = load_workflow(args.workflow) if args.workflow else load_workflow()
        defaults = {**train_settings(workflow), "class_word": None}  # the example's class word fits no user
        unknown = sorted({key for key, _ in args.set} - set(defaults))
        if unknown:
            raise ConceptError(f"--set: unknown keys {unknown}; the keys are {sorted(defaults)}.")
        defaults.update(args.set)
        concepts = find_concepts(args.concepts, defaults)
    except (ConceptError, OSError) as exc:
        print(f"perres_batch: {exc}", file=sys.stderr)
        return 2

    def prompt_for(concept):
        return training_prompt(workflow, concept, args.checkpoint, args.prefix)

    with logging_redirect_tqdm():
        outcome = asyncio.run(run_batch(concepts, args.server, prompt_for, manifest_path, args.timeout))
    report(outcome, manifest_path)
    return 0 if outcome.ok else 1


if __name__ == "__main__":
    sys.exit(main())
