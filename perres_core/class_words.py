"""Choosing the class word with the frozen model itself, as a diffusion classifier.

The paper names its weak spot: "our approach can be sensitive to the choice of macro class" (§5). Li et al.
(ICCV 2023, "Your Diffusion Model is Secretly a Zero-Shot Classifier") rank captions c by the model's own
ε-prediction error E_{t,ε}‖ε − ε_θ(x_t, t, c)‖², the Monte-Carlo estimate of the ELBO that decides
p(c | x); the caption the model denoises the images best with wins. Two of their choices keep the
estimate cheap and the comparison fair, and are kept here: every candidate is scored at the same timesteps
with the same noise (the differences between candidates are then paired and far less noisy than the
errors), and the budget is spent adaptively: all candidates are screened with a few trials, and the rest of
the budget goes to the best few (their Sec. 3.3, "to_keep 5 1").

Host-free: the caller passes an ε-predicting function, clean latents and one caption embedding per word.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .errors import PerResError
from .diffusion import Conditioning
from .training import ConditioningLike, PredictFn, ScheduleLike, epsilon_errors

CAPTION_TEMPLATE = "a photo of a {word}"  # the training caption without the identifier (paper §4.1)
# Everyday categories, one group a line: people, pets and animals, toys, objects (DreamBooth's and
# CustomConcept101's classes among them), vehicles, buildings, food, plants and scenes.
DEFAULT_GROUPS = (
    ("person", "man", "woman", "child", "baby"),
    ("dog", "cat", "bird", "rabbit", "horse"),
    ("toy", "teddy bear", "stuffed animal", "doll", "figurine", "robot"),
    ("backpack", "handbag", "shoe", "sneaker", "sunglasses", "watch", "cup", "mug", "vase", "teapot", "bowl",
     "candle", "chair", "lamp", "guitar"),
    ("car", "bicycle", "motorcycle", "boat"),
    ("house", "building", "castle"),
    ("cake", "pizza", "fruit"),
    ("flower", "plant", "tree"),
    ("landscape", "mountain", "beach", "city", "room"),
)
DEFAULT_CANDIDATES = tuple(word for group in DEFAULT_GROUPS for word in group)
DEFAULT_CANDIDATE_TEXT = "\n".join(", ".join(group) for group in DEFAULT_GROUPS)
DEFAULT_BUDGET = 12
# Li et al. keep the best 5 after screening; screening spends a quarter of the budget on every candidate.
FINALISTS = 5
SCREENING_SHARE = 0.25
# Words of letters with inner hyphens or apostrophes ("t-shirt", "teddy bear"); at most three of them.
_WORD = r"[^\W\d_]+(?:[-'][^\W\d_]+)*"
CANDIDATE_PATTERN = re.compile(rf"{_WORD}(?: {_WORD}){{0,2}}")
MAX_CANDIDATES = 500

ProgressFn = Callable[[int, int], None]


def parse_candidates(text: str) -> list[str]:
    """The candidate words of a comma- or newline-separated list, in order; every problem is an error."""
    entries = [" ".join(part.split()) for part in re.split(r"[,\n]", text or "")]
    words = [entry for entry in entries if entry]
    if not words:
        raise PerResError("the candidate list is empty; give class words separated by commas or new lines, "
                          "e.g. 'dog, cat, toy'.")
    bad = [word for word in words if not CANDIDATE_PATTERN.fullmatch(word)]
    if bad:
        shown = ", ".join(repr(word) for word in bad[:5])
        raise PerResError(f"{shown} {'is not a word' if len(bad) == 1 else 'are not words'}: a candidate is one to "
                          "three words of letters (hyphens and apostrophes inside a word are fine), without "
                          "digits, prompt syntax or whole captions; separate candidates with commas or new lines.")
    seen: dict[str, str] = {}
    for word in words:
        key = word.lower()
        if key in seen:
            raise PerResError(f"'{word}' is listed twice (as '{seen[key]}' too); remove the duplicate.")
        seen[key] = word
    if len(words) > MAX_CANDIDATES:
        raise PerResError(f"{len(words)} candidates; at most {MAX_CANDIDATES} are scored in one run.")
    return words


def caption_for(word: str) -> str:
    return CAPTION_TEMPLATE.format(word=word)


def check_budget(budget: int) -> None:
    if not isinstance(budget, int) or budget < 1:
        raise PerResError(f"budget must be at least 1 timestep per image, got {budget}; {DEFAULT_BUDGET} is the "
                          "default.")


def screening_count(budget: int) -> int:
    return max(1, round(budget * SCREENING_SHARE))


def spread_indices(budget: int, count: int) -> list[int]:
    """`count` indices of range(budget), evenly spread: the screening trials cover the whole range of t."""
    return [min(budget - 1, int((i + 0.5) * budget / count)) for i in range(count)]


def screening_trials(words: int, budget: int) -> list[int]:
    """The trials every word is scored with; with no more words than finalists, all of them."""
    return spread_indices(budget, screening_count(budget)) if words > FINALISTS else list(range(budget))


def evaluation_count(words: int, images: int, budget: int) -> int:
    """Noise predictions of one ranking: every word on the screening trials, the finalists on the rest."""
    screening = len(screening_trials(words, budget))
    return images * (words * screening + min(FINALISTS, words) * (budget - screening))


@dataclass(frozen=True)
class TrialSchedule:
    """The trials of every image: a timestep and a noise tensor per (image, trial), shared by all candidates.

    Trial k of an image draws t uniformly from the k-th of `budget` equal strata of [0, T): stratified
    sampling covers every noise level like Li et al.'s evenly spaced timesteps, and the seed still decides.
    """

    timesteps: torch.Tensor  # (N, budget) long
    noise: torch.Tensor      # (N, budget, C, h, w)

    @classmethod
    def draw(cls, latent_shape: tuple[int, ...], budget: int, num_timesteps: int, seed: int) -> "TrialSchedule":
        check_budget(budget)
        generator = torch.Generator().manual_seed(seed)
        images = latent_shape[0]
        width = num_timesteps / budget
        offsets = torch.rand(images, budget, generator=generator, dtype=torch.float64)
        starts = torch.arange(budget, dtype=torch.float64) * width
        timesteps = (starts + offsets * width).floor().long().clamp_(0, num_timesteps - 1)
        noise = torch.randn(images, budget, *latent_shape[1:], generator=generator)
        return cls(timesteps, noise)

    @property
    def budget(self) -> int:
        return self.timesteps.shape[1]


@dataclass(frozen=True)
class RankedWord:
    word: str
    score: float      # mean ε-MSE over the images and the trials it was scored with; lower is better
    trials: int       # timesteps per image it was scored with
    finalist: bool


@dataclass(frozen=True)
class Ranking:
    """Candidates best first: the finalists by their score over the whole budget, then the screened-out rest."""

    entries: list[RankedWord]
    margin_z: Optional[float]  # best vs. runner-up: mean paired difference / its standard error

    @property
    def best(self) -> str:
        return self.entries[0].word

    def is_close_call(self) -> bool:
        """The runner-up is within two standard errors of the winner: more budget may change the answer."""
        return self.margin_z is not None and self.margin_z < 2.0

    def as_text(self) -> str:
        best = self.entries[0].score
        lines = [f"best: {self.best}  (mean ε-error over the images; lower is better)"]
        for place, entry in enumerate(self.entries, start=1):
            gap = "" if place == 1 or not entry.finalist else f"  +{entry.score - best:.5f}"
            note = "" if entry.finalist else f"  (screened out; score over its {entry.trials} screening t/image)"
            lines.append(f"{place:>3}. {entry.word}  {entry.score:.5f}{gap}{note}")
        return "\n".join(lines)


def rank_words(words: list[str], errors: torch.Tensor, finalists: list[int]) -> Ranking:
    """Rank from per-trial errors (C, N, budget), NaN where a candidate was not scored."""
    evaluated = ~torch.isnan(errors)
    scores = torch.where(evaluated, errors, torch.zeros_like(errors)).sum((1, 2)) / evaluated.sum((1, 2))
    trials = evaluated[:, 0, :].sum(1)
    chosen = set(finalists)
    order = sorted(range(len(words)), key=lambda i: (i not in chosen, scores[i].item(), i))
    entries = [RankedWord(words[i], scores[i].item(), int(trials[i]), i in chosen) for i in order]
    margin = None
    if len(order) > 1:
        both = evaluated[order[0]] & evaluated[order[1]]
        diff = (errors[order[1]] - errors[order[0]])[both].double()
        if diff.numel() > 1:
            spread = diff.std().item() / math.sqrt(diff.numel())
            margin = math.inf if spread == 0 else diff.mean().item() / spread
    return Ranking(entries, margin)


@torch.no_grad()
def score_trials(predict: PredictFn, latents: torch.Tensor, conditioning: Conditioning, schedule: ScheduleLike,
                 trials: TrialSchedule, jobs: list[tuple[int, int, int]], errors: torch.Tensor, chunk_size: int,
                 on_chunk: Optional[Callable[[int], None]] = None, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32) -> None:
    """Fill errors[c, n, k] for each job (candidate c, image n, trial k), `chunk_size` jobs per ε call."""
    for start in range(0, len(jobs), chunk_size):
        c, n, k = (torch.tensor(column) for column in zip(*jobs[start:start + chunk_size]))
        errors[c, n, k] = epsilon_errors(predict, latents[n].float(), trials.noise[n, k], trials.timesteps[n, k],
                                         conditioning.select(c), schedule, device, dtype).cpu()
        if on_chunk is not None:
            on_chunk(len(c))


def rank_candidates(predict: PredictFn, latents: torch.Tensor, conditioning: ConditioningLike, words: list[str],
                    schedule: ScheduleLike, trials: TrialSchedule, chunk_size: int,
                    on_progress: Optional[ProgressFn] = None, device: torch.device | str = "cpu",
                    dtype: torch.dtype = torch.float32) -> Ranking:
    """Score every word's caption on the images (Li et al.'s adaptive diffusion classifier) and rank them.

    latents: (N, C, h, w) clean latents as the model sees them, on the CPU; conditioning: one row per word;
    schedule: the model's ᾱ_t and prediction type; trials: the timesteps and noise every word is scored at.
    on_progress(done, total) counts ε evaluations (one image, one trial, one word each); it may raise to cancel.
    """
    conditioning = Conditioning.of(conditioning)
    if len(conditioning) != len(words):
        raise PerResError(f"{len(conditioning)} caption embeddings for {len(words)} candidates.")
    if chunk_size < 1:
        raise PerResError(f"chunk_size must be at least 1, got {chunk_size}.")
    images, budget = latents.shape[0], trials.budget
    candidates = list(range(len(words)))
    kept = min(FINALISTS, len(words))
    screening = screening_trials(len(words), budget)
    rest = [k for k in range(budget) if k not in screening]
    total = evaluation_count(len(words), images, budget)
    done = 0

    def counted(count: int) -> None:
        nonlocal done
        done += count
        if on_progress is not None:
            on_progress(done, total)

    def run(which: list[int], trial_numbers: list[int]) -> None:
        jobs = [(c, n, k) for c in which for n in range(images) for k in trial_numbers]
        score_trials(predict, latents, conditioning, schedule, trials, jobs, errors, chunk_size, counted,
                     device, dtype)

    errors = torch.full((len(words), images, budget), math.nan)
    run(candidates, screening)
    screened = rank_words(words, errors, candidates)
    finalists = [words.index(entry.word) for entry in screened.entries[:kept]]
    run(finalists, rest)
    return rank_words(words, errors, finalists)
