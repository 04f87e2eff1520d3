"""Text in, text out: render chat prompts, generate with the KV-cache sampler in fixed-size batches, decode.

Used by evaluation (`tulu_jax.stages.eval`) and on-policy data (the pipeline's preferences stage). JAX is imported
inside the functions, so that `tulu-jax` can build its argument parser before a command picks the JAX platform.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

from tulu_jax.data.rows import Row
from tulu_jax.data.sft import tokenize_prompt
from tulu_jax.data.templates import apply_chat_template

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from tulu_jax.models.decoder import Decoder


@dataclasses.dataclass(frozen=True)
class Completion:
    """What the model did with one prompt: the rendered prompt, the decoded response (without its stop token),
    whether a stop token ended it, generated tokens (stop token included) and prompt tokens."""

    prompt: str
    response: str
    finished_with_eos: bool
    num_tokens: int
    num_prompt_tokens: int



def stop_token_ids(tokenizer: PreTrainedTokenizerBase, model: Decoder, extra: Iterable[int] = ()) -> list[int]:
    """Where a response ends: the tokenizer's EOS, the model config's EOS ids and `extra`."""
    ids = set(model.config.eos_token_ids) | {int(i) for i in extra}
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    if not ids:
        raise ValueError("no stop token: neither the tokenizer nor the model config has an EOS id; pass stop_ids")
    return sorted(ids)


def generate_completions(
    model: Decoder,
    tokenizer: PreTrainedTokenizerBase,
    rows: Sequence[Row],
    *,
    chat_template: str = "tulu",
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    batch_size: int = 8,
    seed: int = 0,
    stop_ids: Iterable[int] = (),
    progress: bool = False,
) -> list[Completion]:
    """Render each row's messages with the generation prompt, generate in batches of `batch_size` and decode.

    Every batch has the same size (the last one is filled with copies of its first prompt, whose outputs are
    dropped), so a run compiles one program per prompt-length bucket. Batch i samples with key
    fold_in(key(seed), i). Responses are decoded without their stop token and without special tokens.
    """
    import jax

    from tulu_jax.models.sampler import generate

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    stops = stop_token_ids(tokenizer, model, stop_ids)
    texts = [apply_chat_template(r.data["messages"], tokenizer, template=chat_template, add_generation_prompt=True)
             for r in rows]
    prompts = [tokenize_prompt(r.data["messages"], tokenizer, template=chat_template).tolist() for r in rows]
    key = jax.random.key(seed)
    completions: list[Completion] = []
    for batch_index, start in enumerate(range(0, len(prompts), batch_size)):
        batch = prompts[start:start + batch_size]
        result = generate(
            model,
            batch + [batch[0]] * (batch_size - len(batch)),
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            stop_ids=stops,
            pad_id=tokenizer.pad_token_id,
            rng=jax.random.fold_in(key, batch_index),
        )
        for i, prompt in enumerate(batch):
            length, finished = int(result.lengths[i]), bool(result.finished_eos[i])
            response_ids = result.tokens[i, :length - 1 if finished else length].tolist()
            completions.append(Completion(
                prompt=texts[start + i],
                response=tokenizer.decode(response_ids, skip_special_tokens=True),
                finished_with_eos=finished,
                num_tokens=length,
                num_prompt_tokens=len(prompt),
            ))
        if progress:
            print(f"tulu-jax eval: generated {len(completions)}/{len(prompts)}", file=sys.stderr, flush=True)
    return completions
