"""Ring-A-Bell (Tsai et al., "Ring-A-Bell! How Reliable are Concept Removal Methods for Diffusion Models?",
ICLR 2024): a model-agnostic red-teaming of concept removal, from the text encoder alone.

Two parts, per the official notebooks (chiayi-hsu/Ring-A-Bell @ e4585ad):

* the **concept vector** (``Get_Concept_Vector.ipynb``): the mean difference of the text encoder's hidden
  states (77 × width) between prompts with the concept and the same prompts without it (Sec. 3.2, Eq. 3). The
  prompt pairs are bundled (``data/concepts/ring-a-bell-*.csv``); each pair is encoded ``samples`` = 5 times
  and, for nudity, the repetitions the notebook drops (its ``fail`` list: images NudeNet found safe) are
  dropped, so that the mean weighs the pairs as the notebook's does. It is computed with the *target's* text
  encoder (the notebook: SD 1.4's), or read from a ``.npy`` file (the repository's ``Concept Vectors/``).
* the **genetic search** (``InversePrompt.ipynb``, Sec. 3.3, Eq. 4): for a prompt P, the target hidden states
  ``e(P) + η·c``; a population of 200 prompts ``[start, K random tokens, end…]``; per generation the fitness
  ``Σ (target − e(prompt))²``, the better half kept, one-point crossover (rate 0.5) and one-token mutation
  (rate 0.25); 3000 generations; the best prompt's K tokens, decoded, are the attack (defaults: K = 16,
  η = 3; the bundled violence suites are K = 77 / 38 with η = 5.5 / 5).

What differs (recorded by the job): every draw comes from one NumPy generator seeded by the row's seed, in the
notebook's order (the notebook mixes Python's, NumPy's and torch's global generators); the nudity prompts are
read as text (the notebook's pandas call turns their ``None`` cells into NaN on pandas ≥ 2, which changes the
prompts; as text they are the prompts the notebook's branches were written for).
"""

from __future__ import annotations

import csv
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import torch

from ..common.errors import InputError

#: The repetitions of the nudity pairs the notebook drops (``fail``: their SD images were safe per NudeNet).
NUDITY_DROPPED = (134, 15, 16, 147, 151, 35, 38, 174, 55, 62, 202, 204, 91, 93, 95, 96, 98, 106, 109)
CONCEPTS = ("nudity", "violence")


@dataclass(frozen=True)
class Settings:
    """Ring-A-Bell's hyper-parameters, the official notebook's defaults (``InversePrompt.ipynb``, cell 2)."""

    concept: str = "nudity"  # which concept vector; or a .npy file
    coefficient: float = 3.0  # cof (η)
    length: int = 16  # length (K)
    population: int = 200  # population_size
    generations: int = 3000  # generation
    mutation_rate: float = 0.25  # mutateRate
    crossover_rate: float = 0.5  # crossoverRate
    samples: int = 5  # num_samples of Get_Concept_Vector.ipynb

    def __post_init__(self) -> None:
        if self.concept not in CONCEPTS and not self.concept.endswith(".npy"):
            raise InputError(f"Ring-A-Bell concept {self.concept!r}: choose {', '.join(CONCEPTS)} or a .npy file")
        for name in ("length", "population", "generations", "samples"):
            if int(getattr(self, name)) < 1:
                raise InputError(f"Ring-A-Bell {name} must be at least 1, not {getattr(self, name)}")
        if self.population < 2:
            raise InputError("Ring-A-Bell population must be at least 2")
        for name in ("mutation_rate", "crossover_rate"):
            if not 0 <= getattr(self, name) <= 1:
                raise InputError(f"Ring-A-Bell {name} must be in [0, 1], not {getattr(self, name)}")
        if not np.isfinite(self.coefficient):
            raise InputError(f"Ring-A-Bell coefficient must be a finite number, not {self.coefficient}")

    def to_dict(self) -> dict:
        return asdict(self)


#: The bundled prompt pairs' sha256 (data/PROVENANCE.md), checked on reading.
PAIRS_SHA256 = {
    "ring-a-bell-nudity-prompt.csv": "62728fa0e3842c1f31cbd7af5bde22e0332e9dfcb310231086c210a95c6d611f",
    "ring-a-bell-nonudity-prompt.csv": "6e243245939d430d02fa20eecb9b8ec137a0efb6b85bd4a07c161c5888827556",
    "ring-a-bell-violence-30.csv": "845389ffaf0b0473140d4def0dfcfc5c111c99b91de99922ccf87b6b9fc99dee",
}


def _read(name: str) -> list[dict]:
    from ..common.hashing import sha256_bytes

    data = resources.files("safe_diffusion.data").joinpath("concepts").joinpath(name).read_bytes()
    if sha256_bytes(data) != PAIRS_SHA256[name]:
        raise InputError(f"the bundled Ring-A-Bell file {name} is damaged (sha256 differs); reinstall safe-diffusion")
    return list(csv.DictReader(data.decode("utf-8").splitlines()))


def concept_pairs(concept: str) -> tuple[list[tuple[str, str]], tuple[int, ...]]:
    """The bundled (with, without) prompt pairs of `concept` and the repetitions to drop."""
    if concept == "violence":
        rows = _read("ring-a-bell-violence-30.csv")
        return [(r["prompt"], r["prompt1"]) for r in rows], ()
    if concept == "nudity":
        unsafe, safe = _read("ring-a-bell-nudity-prompt.csv"), _read("ring-a-bell-nonudity-prompt.csv")

        def text(r: dict) -> str:
            if r["clothes"] != "None" and r["people"] == "None":
                return f"{r['nudity']}, {r['location']}"
            return f"{r['nudity']} {r['people']}, {r['location']}"

        return [(text(u), s["prompt"]) for u, s in zip(unsafe, safe)], NUDITY_DROPPED
    raise InputError(f"Ring-A-Bell concept {concept!r}: choose {', '.join(CONCEPTS)} or a .npy file")


def encode(text_encoder, tokenizer, prompts: list[str]) -> torch.Tensor:
    """Hidden states (batch, 77, width) of `prompts`, padded to the tokenizer's maximum length."""
    ids = tokenizer(
        prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids
    return text_encoder(ids.to(text_encoder.device))[0]


def concept_vector(text_encoder, tokenizer, concept: str, samples: int = 5) -> torch.Tensor:
    """Eq. 3: the mean over (repeated, minus dropped) pairs of ``e(with) − e(without)``; or the ``.npy`` file."""
    if concept.endswith(".npy"):
        path = Path(concept)
        try:
            vector = torch.from_numpy(np.load(path, allow_pickle=False)).float()
        except (OSError, ValueError) as exc:
            raise InputError(f"cannot read the concept vector {concept!r}: {exc}") from None
        width = text_encoder.config.hidden_size
        if vector.shape != (tokenizer.model_max_length, width):
            raise InputError(
                f"concept vector {concept!r} has shape {tuple(vector.shape)}, the text encoder's hidden states"
                f" are ({tokenizer.model_max_length}, {width})"
            )
        return vector.to(text_encoder.device)
    pairs, dropped = concept_pairs(concept)
    with torch.no_grad():
        diff = encode(text_encoder, tokenizer, [a for a, _ in pairs]) - encode(
            text_encoder, tokenizer, [b for _, b in pairs]
        )
    keep = [i for i in range(len(pairs) * samples) if i not in set(dropped)]
    repeated = diff.repeat_interleave(samples, dim=0)  # each pair encoded `samples` times, as the notebook does
    return repeated[keep].mean(0)


class GeneticSearch:
    """The notebook's genetic algorithm for one target (``fitness``, ``crossover``, ``mutation``, cell 12).

    `rng` is a ``numpy.random.Generator``; its draws follow the notebook's order: the population, then per
    generation, per parent, a crossover coin (and a mate and a point), per individual a mutation coin (and a
    position and a token)."""

    def __init__(self, text_encoder, tokenizer, target: torch.Tensor, settings: Settings, rng: np.random.Generator):
        self.encoder, self.settings, self.rng = text_encoder, settings, rng
        self.target = target
        n = int(tokenizer.model_max_length)
        self.length = min(settings.length, n - 2)
        self.bos, self.eos = int(tokenizer.bos_token_id), int(tokenizer.eos_token_id)
        self.high = min(self.bos, self.eos)  # randint(1, 49406): any token but 0 and the two special ones
        if self.high <= 1:
            raise InputError("Ring-A-Bell needs a tokenizer whose start and end tokens come after the others")
        self.n = n
        self.population = [self._individual() for _ in range(settings.population)]
        self.best_loss: float | None = None

    def _individual(self) -> np.ndarray:
        middle = self.rng.integers(1, self.high, size=self.length)
        return np.concatenate([[self.bos], middle, [self.eos] * (self.n - 1 - self.length)]).astype(np.int64)

    def fitness(self, population: list[np.ndarray]) -> np.ndarray:
        """``((target − e(prompt))²).sum over tokens and width``, per prompt, in one batch."""
        ids = torch.from_numpy(np.stack(population)).to(self.target.device)
        with torch.no_grad():
            embeds = self.encoder(ids)[0]
        return ((self.target - embeds) ** 2).sum(dim=(1, 2)).double().cpu().numpy()

    def generation(self, last: bool = False) -> float:
        """Score, keep the better half; unless `last`, crossover then mutation. Returns the best loss."""
        score = self.fitness(self.population)
        order = np.argsort(score)
        self.population = [self.population[i] for i in order][: self.settings.population // 2]
        if not last:
            self.population = self._mutation(self._crossover(self.population))
        self.best_loss = float(score[order[0]])
        return self.best_loss

    def _crossover(self, parents: list[np.ndarray]) -> list[np.ndarray]:
        out = []
        for i in range(len(parents)):
            out.append(parents[i])
            if self.rng.random() < self.settings.crossover_rate:
                mate = int(self.rng.integers(0, len(parents)))
                point = int(self.rng.integers(1, self.length + 1))
                out.append(np.concatenate([parents[i][:point], parents[mate][point:]]))
                out.append(np.concatenate([parents[mate][:point], parents[i][point:]]))
        return out

    def _mutation(self, population: list[np.ndarray]) -> list[np.ndarray]:
        for member in population:
            if self.rng.random() < self.settings.mutation_rate:
                position = int(self.rng.integers(1, self.length + 1))
                member[position] = int(self.rng.integers(1, self.high))  # in place, as the notebook's tensors
        return population

    def run(self, generations: int | None = None) -> list[float]:
        total = self.settings.generations if generations is None else generations
        return [self.generation(last=g == total - 1) for g in range(total)]

    def best_ids(self) -> np.ndarray:
        """The K tokens of the best prompt (the population is sorted after the last generation)."""
        return self.population[0][1 : self.length + 1]


def target_embedding(text_encoder, tokenizer, prompt: str, vector: torch.Tensor, coefficient: float) -> torch.Tensor:
    """``e(P) + η·c`` (Eq. 4's target)."""
    with torch.no_grad():
        return encode(text_encoder, tokenizer, [prompt]) + coefficient * vector


def attack_prompt(text_encoder, tokenizer, prompt: str, vector: torch.Tensor, settings: Settings, seed: int):
    """The Ring-A-Bell prompt of `prompt`: the decoded best tokens and the per-generation best losses."""
    target = target_embedding(text_encoder, tokenizer, prompt, vector, settings.coefficient)
    search = GeneticSearch(text_encoder, tokenizer, target, settings, np.random.default_rng(seed))
    losses = search.run()
    return tokenizer.decode(search.best_ids().tolist()), losses
