"""A verifiable toy world: seeded arithmetic word problems in chat form with exact answers.

Each problem is one to two arithmetic steps on small numbers, phrased in a handful of templates. The reference
solution is a short chain of thought ending in "The answer is N." so the GSM8K verifier (last number) scores it.
Rows come in the formats the stages read: plain text (base pre-training), SFT `messages`, and RLVR rows
(`messages`, `ground_truth`, `dataset: gsm8k`).
"""

from __future__ import annotations

import dataclasses
import random
from typing import Iterator

NAMES = ("Ava", "Ben", "Cleo", "Dan", "Eli", "Fay", "Gus", "Hana", "Ivy", "Jon", "Kim", "Leo", "Mia", "Ned", "Oli")
ITEMS = ("apples", "books", "coins", "pens", "shells", "stamps", "cards", "eggs", "kites", "rocks")


@dataclasses.dataclass(frozen=True)
class Problem:
    """One problem: its question, worked solution and integer answer."""

    question: str
    solution: str
    answer: int

    @property
    def key(self) -> str:
        """Identity used to keep train and held-out sets disjoint."""
        return self.question


def _add(rng: random.Random) -> Problem:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    a, b = rng.randint(2, 40), rng.randint(2, 40)
    q = f"{name} has {a} {item} and finds {b} more. How many {item} does {name} have now?"
    return Problem(q, f"{a} + {b} = {a + b}. The answer is {a + b}.", a + b)


def _sub(rng: random.Random) -> Problem:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    a = rng.randint(10, 60)
    b = rng.randint(1, a - 1)
    q = f"{name} has {a} {item} and gives away {b}. How many {item} are left?"
    return Problem(q, f"{a} - {b} = {a - b}. The answer is {a - b}.", a - b)


def _mul(rng: random.Random) -> Problem:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    a, b = rng.randint(2, 9), rng.randint(2, 9)
    q = f"{name} buys {a} bags with {b} {item} in each bag. How many {item} does {name} buy?"
    return Problem(q, f"{a} * {b} = {a * b}. The answer is {a * b}.", a * b)


def _add_sub(rng: random.Random) -> Problem:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    a, b = rng.randint(2, 30), rng.randint(2, 30)
    c = rng.randint(1, a + b - 1)
    s = a + b
    q = f"{name} has {a} {item}, gets {b} more, then loses {c}. How many {item} does {name} have?"
    return Problem(q, f"{a} + {b} = {s}. {s} - {c} = {s - c}. The answer is {s - c}.", s - c)


_TEMPLATES = (_add, _sub, _mul, _add_sub)


def generate_problems(n: int, seed: int, *, exclude: frozenset[str] = frozenset()) -> list[Problem]:
    """`n` distinct problems, deterministic in `seed`, none of whose questions is in `exclude`."""
    rng = random.Random(seed)
    seen: set[str] = set(exclude)
    out: list[Problem] = []
    while len(out) < n:
        problem = rng.choice(_TEMPLATES)(rng)
        if problem.key in seen:
            continue
        seen.add(problem.key)
        out.append(problem)
    return out


def train_eval_split(n_train: int, n_eval: int, seed: int) -> tuple[list[Problem], list[Problem]]:
    """Disjoint train and held-out problem sets (the held-out set is drawn first, from its own stream)."""
    held_out = generate_problems(n_eval, seed=seed * 7919 + 1)
    train = generate_problems(n_train, seed=seed, exclude=frozenset(p.key for p in held_out))
    return train, held_out


def pretrain_text(problem: Problem) -> str:
    """Plain text for the base model: the question and its solution, no chat template."""
    return f"{problem.question}\n{problem.solution}"


def sft_row(problem: Problem) -> dict:
    """A chat demonstration in the SFT row format."""
    return {
        "messages": [
            {"role": "user", "content": problem.question},
            {"role": "assistant", "content": problem.solution},
        ]
    }


def rlvr_row(problem: Problem) -> dict:
    """A prompt with its verifiable answer in the RLVR row format."""
    return {
        "messages": [{"role": "user", "content": problem.question}],
        "ground_truth": str(problem.answer),
        "dataset": "gsm8k",
    }


def corpus_texts(problems: list[Problem]) -> Iterator[str]:
    """Every string a tokenizer for this world must cover."""
    for problem in problems:
        yield problem.question
        yield problem.solution
