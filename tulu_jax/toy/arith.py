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

# Single-digit operands: a tiny decoder learns these tables in a few CPU minutes, but not from a handful of steps.
DEFAULT_MAX_OPERAND = 9


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


def _add(rng: random.Random, n: int) -> Problem:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    a, b = rng.randint(1, n), rng.randint(1, n)
    q = f"{name} has {a} {item} and finds {b} more. How many {item} does {name} have now?"
    return Problem(q, f"{a} + {b} = {a + b}. The answer is {a + b}.", a + b)


def _sub(rng: random.Random, n: int) -> Problem:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    a = rng.randint(2, 2 * n)
    b = rng.randint(1, a - 1)
    q = f"{name} has {a} {item} and gives away {b}. How many {item} are left?"
    return Problem(q, f"{a} - {b} = {a - b}. The answer is {a - b}.", a - b)


def _mul(rng: random.Random, n: int) -> Problem:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    a, b = rng.randint(2, n), rng.randint(2, n)
    q = f"{name} buys {a} bags with {b} {item} in each bag. How many {item} does {name} buy?"
    return Problem(q, f"{a} * {b} = {a * b}. The answer is {a * b}.", a * b)


def _add_sub(rng: random.Random, n: int) -> Problem:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    a, b = rng.randint(1, n), rng.randint(1, n)
    s = a + b
    c = rng.randint(1, s - 1)
    q = f"{name} has {a} {item}, gets {b} more, then loses {c}. How many {item} does {name} have?"
    return Problem(q, f"{a} + {b} = {s}. {s} - {c} = {s - c}. The answer is {s - c}.", s - c)


_TEMPLATES = (_add, _sub, _mul, _add_sub)


def generate_problems(
    n: int, seed: int, *, max_operand: int = DEFAULT_MAX_OPERAND, exclude: frozenset[str] = frozenset()
) -> list[Problem]:
    """`n` distinct problems, deterministic in `seed`, none of whose questions is in `exclude`.

    Operands are at most `max_operand` (subtraction starts from up to twice that). ValueError when `n` distinct
    problems are out of reach (the world is finite: templates × names × items × operands)."""
    if max_operand < 2:
        raise ValueError(f"max_operand must be >= 2, got {max_operand}")
    rng = random.Random(seed)
    seen: set[str] = set(exclude)
    out: list[Problem] = []
    misses = 0
    while len(out) < n:
        problem = rng.choice(_TEMPLATES)(rng, max_operand)
        if problem.key in seen:
            misses += 1
            if misses > 100 * n + 1000:  # nearly every draw is taken: the request exceeds the world
                raise ValueError(f"cannot draw {n} distinct problems with max_operand={max_operand}")
            continue
        seen.add(problem.key)
        out.append(problem)
    return out


def train_eval_split(
    n_train: int, n_eval: int, seed: int, *, max_operand: int = DEFAULT_MAX_OPERAND
) -> tuple[list[Problem], list[Problem]]:
    """Disjoint train and held-out problem sets (the held-out set is drawn first, from its own stream)."""
    held_out = generate_problems(n_eval, seed=seed * 7919 + 1, max_operand=max_operand)
    train = generate_problems(
        n_train, seed=seed, max_operand=max_operand, exclude=frozenset(p.key for p in held_out)
    )
    return train, held_out


def pretrain_text(problem: Problem) -> str:
    """Plain text for the base model: the question and its solution, no chat template."""
    return f"{problem.question}\n{problem.solution}"


def pretrain_documents(problems: list[Problem], seed: int, *, min_per_doc: int = 2, max_per_doc: int = 4) -> list[str]:
    """Plain-text documents for the base model, each several problems with their solutions in a row.

    A document never ends after its first solution, so the base model learns to go on with another problem, as a
    pretrained model does: stopping after one answer is what SFT teaches. Every problem is used once, in order.
    """
    if not 1 <= min_per_doc <= max_per_doc:
        raise ValueError(f"need 1 <= min_per_doc <= max_per_doc, got {min_per_doc}, {max_per_doc}")
    rng = random.Random(seed)
    docs, start = [], 0
    while start < len(problems):
        size = rng.randint(min_per_doc, max_per_doc)
        docs.append("\n\n".join(pretrain_text(p) for p in problems[start:start + size]))
        start += size
    return docs


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
