"""On-policy distillation (GKD, Agarwal et al. 2306.13649): with probability λ a batch's responses are the student's.

`OnPolicyStep(setup, step, batcher)` is what the loop calls per host batch (padded chat rows). With probability λ,
drawn from (train.seed, step) so a resumed run draws the same, it takes each row's prompt (the tokens up to its
first supervised token), samples a response from the student with `tulu_jax.rl.rollout.Rollout` — the sampler jitted
with the train state's own shardings over `state.params` themselves (no copy) — and replaces the row by prompt +
sampled response (response tokens supervised, the stop token included, cut to data.max_seq_len). Then the step runs
on the mesh with the teacher scoring every response token. Metrics gain `on_policy` (1 for a student batch).

Rollouts are assembled on the host (`np.asarray` of the sampled tokens): a single-process run.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from tulu_jax.data.batching import IGNORE_INDEX, build_batch, check_row
from tulu_jax.rl.rollout import Rollout
from tulu_jax.train import Step, TrainState, shardings_of
from tulu_jax.train.batcher import Batcher


def prompts_of(host: dict[str, np.ndarray]) -> list[np.ndarray | None]:
    """Each row's prompt: its tokens up to and including the one before the first supervised target; None for a
    row with no supervised token (padding rows)."""
    prompts: list[np.ndarray | None] = []
    for ids, mask in zip(host["input_ids"], host["loss_mask"]):
        first = np.flatnonzero(mask)
        prompts.append(ids[: first[0] + 1] if first.size else None)
    return prompts


def student_rows(prompts: list[np.ndarray | None], tokens: np.ndarray, lengths: np.ndarray,
                 seq_len: int) -> list[list[tuple[np.ndarray, np.ndarray]]]:
    """Checked (input_ids, labels) sequences of prompt + sampled response (labels on the response only, cut to
    seq_len); an empty sequence for a row without a prompt."""
    sequences = []
    for prompt, response, n in zip(prompts, tokens, lengths):
        if prompt is None:
            sequences.append([])
            continue
        ids = np.concatenate([prompt, response[:n]])[:seq_len].astype(np.int32)
        labels = ids.copy()
        labels[: len(prompt)] = IGNORE_INDEX
        sequences.append([check_row({"input_ids": ids, "labels": labels}, index=0, seq_len=seq_len)])
    return sequences


class OnPolicyStep:
    """`(state, host batch) -> (state, metrics)`: maybe replace the responses by the student's, then train."""

    def __init__(self, setup: Any, step: Step, batcher: Batcher):
        config = setup.config
        distill = config.distill
        self.step, self.batcher, self.frozen = step, batcher, setup.frozen
        self.model_config = setup.model_config
        self.seq_len, self.lam, self.seed = config.data.max_seq_len, distill.lambda_on_policy, config.train.seed
        self.rollout = Rollout(setup.state.graphdef, shardings_of(setup.state), setup.mesh, setup.spec,
                               max_new_tokens=distill.max_new_tokens, temperature=distill.sampling_temperature)

    def on_policy(self, step: int) -> bool:
        """Whether step `step` trains on the student's samples (a pure function of seed and step)."""
        return bool(np.random.default_rng([self.seed, step]).random() < self.lam)

    def student_batch(self, state: TrainState, host: dict[str, np.ndarray], step: int) -> dict[str, np.ndarray]:
        """The host batch with every row's response sampled from the student (state's parameters)."""
        prompts = prompts_of(host)
        # Padding rows still need a prompt to keep the batch shape: one pad token, dropped afterwards.
        pad = self.model_config.pad_token_id or 0
        feed = [p if p is not None else np.array([pad], np.int32) for p in prompts]
        ids, mask, stops, pad_id = self.rollout.place_prompts(
            self.model_config, feed, eos_id=self.model_config.eos_token_id, pad_id=pad)
        key = self.rollout.place_rng(jax.random.fold_in(jax.random.key(self.seed), step))
        out = self.rollout(state, ids, mask, key, stops, pad_id)
        tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
        return build_batch(student_rows(prompts, tokens, lengths, self.seq_len), self.seq_len)

    def __call__(self, state: TrainState, host: dict[str, np.ndarray]) -> tuple[TrainState, dict[str, Any]]:
        step = int(jax.device_get(state.step))
        flag = self.on_policy(step)
        if flag:
            host = self.student_batch(state, host, step)
        state, metrics = self.step(state, self.batcher(host), self.frozen)
        return state, {**metrics, "on_policy": np.float32(flag)}
