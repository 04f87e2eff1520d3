"""The RLVR iteration loop (`tulu-jax rlvr`): prompts → rollouts from the policy being trained → verifier scores →
`RolloutBatch` → K PPO epochs over shuffled minibatches; metrics, checkpoints, resume and export.

Determinism: iteration i takes the next `rlvr.rollout_prompts` (default global_batch_size / group_size) prompts of
a per-epoch permutation seeded by (data.seed, epoch), samples with `fold_in(state.rng, i)` and shuffles minibatches
with (train.seed, i, epoch), so the prompt iterator's whole state is the iteration number (stored with each
checkpoint) and a resumed run draws the same rollouts as an uninterrupted one.

Dynamic sampling (GRPO, `rlvr.rollout_prompts` above the trained global_batch_size / group_size groups): the
iteration trains on the groups whose scores differ first (`tulu_jax.rl.rewards.groups_with_spread_first`); the
reward, verifier, non-stop and length metrics stay those of every sampled row, the KL, entropy and loss metrics are
the trained rows'.

Scoring overlaps generation within an iteration, on-policy: the rollout batch is generated in `rlvr.rollout_chunks`
row blocks, and while chunk k + 1 is sampled, chunk k's responses are decoded and scored by the verifier worker
processes (`rlvr.overlap_scoring: false` scores each chunk before sampling the next: the same rollouts and
scores). Training still waits for the whole batch, since on-policy PPO needs every score before its update; only
an asynchronous one-step-off-policy variant could overlap the next iteration's generation with training.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import functools
import pathlib
import sys
import time
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from tulu_jax.data.rows import Row, mix_sources
from tulu_jax.data.sft import tokenize_prompt
from tulu_jax.errors import DataError
from tulu_jax.models.sampler import bucket_length, prepare_prompts
from tulu_jax.rl.ppo_step import POLICY, VALUE, build_select_rows
from tulu_jax.rl.rewards import groups_with_spread_first, rows_of_groups, sequence_scores
from tulu_jax.rl.rollout import Rollout, RolloutOutput, local_rows, place_process_rows, process_rows
from tulu_jax.rl.verifiers.batch import score_batch
from tulu_jax.stages.rlvr import STAGE, rollout_prompts
from tulu_jax.stages.training import StageSetup
from tulu_jax.train import Checkpointer, MetricsWriter, shardings_of
from tulu_jax.train.guard import SKIPPED_METRIC, NonfiniteCounter
from tulu_jax.train.loop import _SigtermFlag
from tulu_jax.train.metrics import ProgressBar
from tulu_jax.train.multi import MultiTrainState
from tulu_jax.train.step import Step


@dataclasses.dataclass
class Prompts:
    """The validated RLVR rows, their prompt token ids (rendered with the generation prompt), and the counts."""

    rows: list[Row]
    ids: list[list[int]]
    report: dict[str, Any]


def load_prompts(config: Any, tokenizer: Any) -> Prompts:
    """Rows of `data.sources` validated as RLVR rows (DataError naming file/row/field: a missing `ground_truth`, an
    unknown `dataset`, ...) and tokenized; prompts over `data.max_seq_len` tokens are dropped and counted."""
    from tulu_jax.stages.eval import validate_eval_row

    data = config.data
    rows, stats = mix_sources([s.to_source() for s in data.sources], seed=data.seed, on_error=data.on_error,
                              validate=validate_eval_row, shuffle=False, max_bad_fraction=data.max_bad_fraction)
    kept, ids, too_long = [], [], 0
    for row in rows:
        tokens = tokenize_prompt(row.data["messages"], tokenizer, template=config.tokenizer.chat_template)
        if len(tokens) > data.max_seq_len:
            too_long += 1
            continue
        kept.append(row)
        ids.append(tokens.tolist())
    if not kept:
        raise DataError(f"no prompt of at most data.max_seq_len={data.max_seq_len} tokens",
                        file=", ".join(s.path for s in data.sources))
    datasets = collections.Counter(row.data["dataset"].lower() for row in kept)
    report = {"prompts": len(kept), "too_long": too_long, "datasets": dict(datasets),
              "sources": [{"source": s.source, "rows": s.rows, "valid": s.valid, "skipped": s.skipped}
                          for s in stats]}
    print(f"tulu-jax rlvr: {len(kept)} prompts ({dict(datasets)}), {too_long} longer than {data.max_seq_len} "
          "tokens dropped", file=sys.stderr)
    return Prompts(kept, ids, report)


def stop_ids(model_config: Any, tokenizer: Any) -> list[int]:
    """A response ends at the model config's or the tokenizer's EOS."""
    ids = set(model_config.eos_token_ids)
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return sorted(ids)


class RLVRLoop:
    """One stage run's programs (rollout, prepare, step, minibatch selection) and its iteration loop."""

    def __init__(self, setup: StageSetup, step: Step, batch_shardings: Any):
        self.setup, self.step = setup, step
        config = setup.config
        self.rl, self.prompts = config.rlvr, setup.data.dataset
        shardings = shardings_of(setup.state)
        policy = setup.state.models[POLICY]
        self.rollout = Rollout(policy.graphdef, shardings.models[POLICY], setup.mesh, setup.spec,
                               max_new_tokens=self.rl.max_new_tokens, temperature=self.rl.temperature)
        self.prepare = STAGE.build_prepare(setup)
        self.select = build_select_rows(batch_shardings)
        self.replicate = jax.jit(lambda x: x, out_shardings=self.rollout.replicated)
        # Chunks' rollouts into one, field by field, laid out directly where the whole rollout lives.
        self.concatenate = jax.jit(lambda outs: jax.tree.map(lambda *parts: jnp.concatenate(parts), *outs),
                                   out_shardings=self.rollout.output_shardings)
        self.stops = stop_ids(setup.model_config, setup.tokenizer)
        self.per_iteration = rollout_prompts(config)  # prompts sampled per iteration
        self.trained_groups = config.train.global_batch_size // self.rl.group_size
        kept = (self.rollout.output_shardings, self.rollout.row_sharding)  # (rollout, scores)
        self.take_rows = jax.jit(lambda arrays, rows: jax.tree.map(lambda x: jnp.take(x, rows, axis=0), arrays),
                                 in_shardings=(kept, self.rollout.replicated), out_shardings=kept)
        self.nonfinite: NonfiniteCounter | None = None  # set by `run`: stops after consecutive skipped updates

    # ------------------------------------------------------------------------------------------ one iteration

    def prompt_rows(self, iteration: int) -> list[int]:
        """Indices into the prompts of iteration `iteration`'s sequences (each prompt group_size times in a row)."""
        n, seed = len(self.prompts.rows), self.setup.config.data.seed
        start = iteration * self.per_iteration
        orders: dict[int, np.ndarray] = {}
        picked = []
        for position in range(start, start + self.per_iteration):
            epoch = position // n
            if epoch not in orders:
                orders[epoch] = np.random.default_rng([seed, epoch]).permutation(n)
            picked.append(int(orders[epoch][position % n]))
        return [i for i in picked for _ in range(self.rl.group_size)]

    def _chunks(self, state: MultiTrainState, iteration: int) -> Iterator[tuple[RolloutOutput, list[int]]]:
        """Iteration `iteration`'s rollouts, `rlvr.rollout_chunks` consecutive row blocks in turn, each sampled
        from the policy's own arrays with key fold_in(fold_in(state.rng, iteration), chunk) and ready when yielded
        (the prompts share one left-padded block, so the chunks concatenate)."""
        indices = self.prompt_rows(iteration)
        config, pad_id = self.setup.model_config, self.setup.tokenizer.pad_token_id
        width = bucket_length(max(len(self.prompts.ids[i]) for i in indices))

        def prompt_block(prompts: list[int], local: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            """This process's rows of a chunk's prompts, left-padded to the iteration's width (validated)."""
            ids, mask, _, pad = prepare_prompts(config, [self.prompts.ids[prompts[r]] for r in local], None,
                                                eos_id=None, stop_ids=self.stops, pad_id=pad_id)
            extra = ((0, 0), (width - ids.shape[1], 0))
            return np.pad(ids, extra, constant_values=pad), np.pad(mask, extra)

        _, _, stops, pad = prepare_prompts(config, [self.prompts.ids[indices[0]]], None, eos_id=None,
                                           stop_ids=self.stops, pad_id=pad_id)  # the stop-id block and pad id
        stops, pad = jax.device_put((stops, np.int32(pad)), self.rollout.replicated)
        key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), iteration)
        size = len(indices) // self.rl.rollout_chunks
        for chunk in range(self.rl.rollout_chunks):
            rows = indices[chunk * size:(chunk + 1) * size]
            ids, mask = place_process_rows(self.rollout.batch_sharding, size, functools.partial(prompt_block, rows))
            out = self.rollout(state.models[POLICY], ids, mask,
                               self.rollout.place_rng(jax.random.fold_in(key, chunk)), stops, pad)
            jax.block_until_ready(out.tokens)
            yield out, rows

    def _concatenate(self, outs: list[RolloutOutput]) -> RolloutOutput:
        """The chunks' outputs as one batch-sharded rollout."""
        return outs[0] if len(outs) == 1 else self.concatenate(outs)

    def generate(self, state: MultiTrainState, iteration: int) -> tuple[RolloutOutput, list[int]]:
        """Sample all of iteration `iteration`'s responses (every chunk) from the policy's own arrays."""
        outs, indices = [], []
        for out, rows in self._chunks(state, iteration):
            outs.append(out)
            indices.extend(rows)
        return self._concatenate(outs), indices

    def score_chunk(self, out: RolloutOutput, indices: list[int]) -> tuple[jax.Array, int, float]:
        """This process's decoded responses scored by their rows' verifiers in worker processes: ([B] scores, a
        global row-sharded array; this process's timeouts; seconds)."""
        start = time.perf_counter()
        tokens, lengths, finished = (local_rows(x) for x in (out.tokens, out.lengths, out.finished))
        tokenizer = self.setup.tokenizer
        responses = [tokenizer.decode(tokens[i, :lengths[i] - 1 if finished[i] else lengths[i]].tolist(),
                                      skip_special_tokens=True) for i in range(len(tokens))]
        rows = [self.prompts.rows[indices[r]].data for r in process_rows(self.rollout.row_sharding, len(indices))]
        scores, timeouts = score_batch([row["dataset"] for row in rows], responses,
                                       [row["ground_truth"] for row in rows])
        placed = place_process_rows(self.rollout.row_sharding, len(indices), lambda _: scores)
        return placed, timeouts, time.perf_counter() - start

    def rollouts(self, state: MultiTrainState, iteration: int
                 ) -> tuple[RolloutOutput, list[int], jax.Array, dict[str, float]]:
        """Generate and score iteration `iteration`'s rollouts: (rollout, prompt indices, [B] row-sharded scores,
        metrics). Each process builds, decodes and scores only its own rows (`tulu_jax.rl.rollout.process_rows`).

        With `rlvr.overlap_scoring` chunk k is decoded and scored (a host thread feeding the verifier workers) while
        chunk k + 1 is generated; without, each chunk is scored before the next is generated. Both draw the same
        rollouts and scores. Metrics: generation_s and scoring_s (summed over the chunks), rollout_s (their
        overlapped wall time), verifier_timeouts, accuracy/<dataset>."""
        start = time.perf_counter()
        outs, indices, jobs, generation_s = [], [], [], 0.0
        with concurrent.futures.ThreadPoolExecutor(1) as scorer:
            chunks, clock = self._chunks(state, iteration), time.perf_counter()
            for out, rows in chunks:
                generation_s += time.perf_counter() - clock
                outs.append(out)
                indices.extend(rows)
                if self.rl.overlap_scoring:
                    jobs.append(scorer.submit(self.score_chunk, out, rows))
                else:
                    done: concurrent.futures.Future = concurrent.futures.Future()
                    done.set_result(self.score_chunk(out, rows))
                    jobs.append(done)
                clock = time.perf_counter()
            results = [job.result() for job in jobs]
        scores = jnp.concatenate([r[0] for r in results])
        all_scores = np.asarray(self.replicate(scores))  # a few floats: every host's metrics see every row
        datasets = [self.prompts.rows[i].data["dataset"].lower() for i in indices]
        metrics = {"verifier_timeouts": float(sum(r[1] for r in results)), "generation_s": generation_s,
                   "scoring_s": sum(r[2] for r in results), "rollout_s": time.perf_counter() - start}
        for name in sorted(set(datasets)):
            metrics[f"accuracy/{name}"] = float(np.mean([s for s, d in zip(all_scores, datasets) if d == name]))
        return self._concatenate(outs), indices, jax.device_put(scores, self.rollout.row_sharding), metrics

    def train(self, state: MultiTrainState, batch: Any, iteration: int) -> tuple[MultiTrainState, list[dict]]:
        """`ppo_epochs` passes over `num_minibatches` shuffled minibatches of the rollout batch (whole groups of
        `rlvr.prompt_group` rows where the forward passes share each group's prompt)."""
        size, group = batch.tokens.shape[0], self.rl.prompt_group
        per_minibatch = size // self.rl.num_minibatches
        all_metrics = []
        for epoch in range(self.rl.ppo_epochs):
            groups = np.random.default_rng([self.setup.config.train.seed, iteration, epoch]).permutation(size // group)
            order = rows_of_groups(groups, group)
            for k in range(self.rl.num_minibatches):
                rows = jax.device_put(order[k * per_minibatch:(k + 1) * per_minibatch],
                                      self.rollout.replicated)
                state, metrics = self.step(state, self.select(batch, rows), self.setup.frozen)
                all_metrics.append(metrics)
        return state, all_metrics

    def trained_rows(self, out: RolloutOutput, scores: jax.Array
                     ) -> tuple[RolloutOutput, jax.Array, dict[str, float]]:
        """The rollout rows an iteration trains on: all of them, or (dynamic sampling) the `trained_groups` groups
        whose sequence scores differ first; then also the metrics of every sampled row (module docstring)."""
        if self.per_iteration == self.trained_groups:
            return out, scores, {}
        verifier, finished, lengths = map(np.asarray, jax.device_get(
            self.replicate((scores, out.finished, out.lengths))))  # [B] each: one transfer to every host
        sequence = np.asarray(sequence_scores(verifier, finished, alpha=self.rl.alpha,
                                              non_stop_penalty=self.rl.non_stop_penalty))
        rows, with_spread = groups_with_spread_first(sequence, self.rl.group_size, self.trained_groups)
        out, scores = self.take_rows((out, scores), jax.device_put(rows, self.rollout.replicated))
        metrics = {"score": float(sequence.mean()), "verifier": float(verifier.mean()),
                   "non_stop_rate": float(1.0 - finished.mean()), "response_length": float(lengths.mean()),
                   "sampled_groups_with_spread": float(with_spread)}
        return out, scores, metrics

    def iteration(self, state: MultiTrainState, iteration: int) -> tuple[MultiTrainState, dict[str, float]]:
        """Generate, score, prepare, train; the iteration's metrics (step metrics averaged over its updates)."""
        out, _, scores, metrics = self.rollouts(state, iteration)
        out, scores, sampled_metrics = self.trained_rows(out, scores)
        scored = time.perf_counter()
        models = {name: (m.params, m.model_state) for name, m in state.models.items()}
        batch, prepare_metrics = self.prepare(
            models, self.setup.frozen, out.prompt_ids, out.prompt_mask, out.tokens, out.lengths, out.finished, scores,
            out.logprobs)
        state, step_metrics = self.train(state, batch, iteration)
        host_steps, host_prepare = jax.device_get((step_metrics, prepare_metrics))
        trained = time.perf_counter()
        if self.nonfinite is not None:
            for m in host_steps:
                self.nonfinite.record(iteration + 1, {**m, "grad_norm": m["policy_grad_norm"]})
        # Step metrics are averaged over the iteration's updates; skipped updates are counted.
        metrics.update({key: float((np.sum if key.endswith(SKIPPED_METRIC) else np.mean)([m[key] for m in host_steps]))
                        for key in host_steps[0]})
        metrics.update({key: float(value) for key, value in host_prepare.items()})
        metrics.update(sampled_metrics)  # every sampled row's reward metrics, not just the trained rows'
        metrics.update(training_s=trained - scored, weight_sync_s=0.0, optimizer_steps=float(len(host_steps)))
        return state, metrics

    # ------------------------------------------------------------------------------------------ the run

    def run(self, iterations: int) -> MultiTrainState:
        """Iterate to `iterations` (resuming from run_dir/checkpoints), checkpoint every output.save_every, write
        metrics.jsonl (one line per iteration), export the policy (run_dir/hf) and value model (run_dir/value_hf)."""
        from tulu_jax.stages.run_dir import export_hf, model_config_dict, prepare_run_dir

        setup, config = self.setup, self.setup.config
        output = config.output
        run_dir = prepare_run_dir(output, config, {"model_config.json": model_config_dict(setup.model_config),
                                                   **setup.data.run_files})
        checkpointer = Checkpointer(run_dir / "checkpoints", max_to_keep=output.keep_last)
        writer = MetricsWriter(run_dir / "metrics.jsonl", run_dir / "tensorboard")
        self.nonfinite = NonfiniteCounter(config.train.max_nonfinite_steps, checkpointer)
        state, start, bar = setup.state, 0, None
        try:
            if checkpointer.latest_step() is not None:
                restored = checkpointer.restore_intact(target=state, strict=output.strict_resume)
                state, start = restored.state, int(restored.data_state["iteration"])
                print(f"tulu-jax: resumed from checkpoint iteration {start} in {checkpointer.directory}",
                      file=sys.stderr)
            bar = ProgressBar(iterations, initial=start, disable=None if output.progress else True)
            with _SigtermFlag() as sigterm:
                for iteration in range(start, iterations):
                    state, metrics = self.iteration(state, iteration)
                    writer.write(iteration + 1, metrics)
                    bar.update(iteration + 1, loss=metrics["loss"])
                    last = iteration + 1 == iterations or sigterm.received
                    if last or output.save_every and (iteration + 1) % output.save_every == 0:
                        checkpointer.save(iteration + 1, state, data_state={"iteration": iteration + 1}, force=True)
                    if sigterm.received and iteration + 1 < iterations:
                        checkpointer.wait()
                        print(f"tulu-jax: SIGTERM received; saved checkpoint iteration {iteration + 1} in "
                              f"{checkpointer.directory}; exiting", file=sys.stderr)
                        raise SystemExit(0)
            checkpointer.wait()
        finally:
            if bar is not None:
                bar.close()
            writer.close()
            checkpointer.close()
        if output.export_hf:
            dtype = output.export_dtype or setup.model_config.param_dtype
            export_hf(state.models[POLICY], run_dir / "hf", setup.tokenizer, dtype)
            if VALUE in state.models:
                from tulu_jax.models.hf_reward_io import save_hf_reward_model

                save_hf_reward_model(state.models[VALUE].model(), pathlib.Path(run_dir) / "value_hf", dtype=dtype)
            print(f"tulu-jax: exported the rlvr policy to {run_dir / 'hf'}", file=sys.stderr)
        return state
