"""The RLVR iteration loop (`tulu-jax rlvr`): prompts → rollouts from the policy being trained → verifier scores →
`RolloutBatch` → K PPO epochs over shuffled minibatches; metrics, checkpoints, resume and export.

Determinism: iteration i takes the next `global_batch_size / group_size` prompts of a per-epoch permutation seeded
by (data.seed, epoch), samples with `fold_in(state.rng, i)` and shuffles minibatches with (train.seed, i, epoch), so
the prompt iterator's whole state is the iteration number (stored with each checkpoint) and a resumed run draws
the same rollouts as an uninterrupted one.

Scoring runs in verifier worker processes after each generation; it is NOT overlapped with the next generation
(on-policy PPO needs the trained policy before it can sample again; an asynchronous one-step-off-policy variant
would be the way to overlap).
"""

from __future__ import annotations

import collections
import dataclasses
import pathlib
import sys
import time
from typing import Any

import jax
import numpy as np

from tulu_jax.data.rows import Row, mix_sources
from tulu_jax.data.sft import tokenize_prompt
from tulu_jax.errors import DataError
from tulu_jax.rl.ppo_step import POLICY, VALUE, build_prepare_fn, build_select_rows
from tulu_jax.rl.rollout import Rollout, RolloutOutput
from tulu_jax.rl.verifiers.batch import score_batch
from tulu_jax.stages.training import StageSetup
from tulu_jax.train import Checkpointer, MetricsWriter, shardings_of
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
        value = setup.state.models.get(VALUE)
        self.prepare = build_prepare_fn(
            policy.graphdef, None if value is None else value.graphdef, self.rl,
            model_shardings={name: (s.params, s.model_state) for name, s in shardings.models.items()},
            frozen_shardings=shardings_of(setup.frozen), batch_sharding=self.rollout.batch_sharding)
        self.select = build_select_rows(batch_shardings)
        self.stops = stop_ids(setup.model_config, setup.tokenizer)
        self.per_iteration = config.train.global_batch_size // self.rl.group_size

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

    def generate(self, state: MultiTrainState, iteration: int) -> tuple[RolloutOutput, list[int]]:
        """Sample responses from the policy's own arrays for iteration `iteration`'s prompts."""
        indices = self.prompt_rows(iteration)
        config = self.setup.model_config
        ids, mask, stops, pad = self.rollout.place_prompts(config, [self.prompts.ids[i] for i in indices],
                                                           stop_ids=self.stops,
                                                           pad_id=self.setup.tokenizer.pad_token_id)
        key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), iteration)
        return self.rollout(state.models[POLICY], ids, mask, self.rollout.place_rng(key), stops, pad), indices

    def score(self, out: RolloutOutput, indices: list[int]) -> tuple[np.ndarray, dict[str, float]]:
        """Decoded responses scored by their rows' verifiers in worker processes: ([B] scores, metrics)."""
        tokens, lengths, finished = jax.device_get((out.tokens, out.lengths, out.finished))
        tokenizer = self.setup.tokenizer
        responses = [tokenizer.decode(tokens[i, :lengths[i] - 1 if finished[i] else lengths[i]].tolist(),
                                      skip_special_tokens=True) for i in range(len(indices))]
        rows = [self.prompts.rows[i].data for i in indices]
        datasets = [row["dataset"] for row in rows]
        scores, timeouts = score_batch(datasets, responses, [row["ground_truth"] for row in rows])
        metrics: dict[str, float] = {"verifier_timeouts": float(timeouts)}
        for name in sorted({d.lower() for d in datasets}):
            chosen = [s for s, d in zip(scores, datasets) if d.lower() == name]
            metrics[f"accuracy/{name}"] = float(np.mean(chosen))
        return scores, metrics

    def train(self, state: MultiTrainState, batch: Any, iteration: int) -> tuple[MultiTrainState, list[dict]]:
        """`ppo_epochs` passes over `num_minibatches` shuffled minibatches of the rollout batch."""
        size = batch.tokens.shape[0]
        per_minibatch = size // self.rl.num_minibatches
        all_metrics = []
        for epoch in range(self.rl.ppo_epochs):
            order = np.random.default_rng([self.setup.config.train.seed, iteration, epoch]).permutation(size)
            for k in range(self.rl.num_minibatches):
                rows = jax.device_put(order[k * per_minibatch:(k + 1) * per_minibatch].astype(np.int32),
                                      self.rollout.replicated)
                state, metrics = self.step(state, self.select(batch, rows), self.setup.frozen)
                all_metrics.append(metrics)
        return state, all_metrics

    def iteration(self, state: MultiTrainState, iteration: int) -> tuple[MultiTrainState, dict[str, float]]:
        """Generate, score, prepare, train; the iteration's metrics (step metrics averaged over its updates)."""
        clock = time.perf_counter()
        out, indices = self.generate(state, iteration)
        jax.block_until_ready(out.tokens)
        generated = time.perf_counter()
        scores, score_metrics = self.score(out, indices)
        scored = time.perf_counter()
        models = {name: (m.params, m.model_state) for name, m in state.models.items()}
        batch, prepare_metrics = self.prepare(
            models, self.setup.frozen, out.prompt_ids, out.prompt_mask, out.tokens, out.lengths, out.finished,
            jax.device_put(np.asarray(scores, np.float32), self.rollout.row_sharding))
        state, step_metrics = self.train(state, batch, iteration)
        host_steps, host_prepare = jax.device_get((step_metrics, prepare_metrics))
        trained = time.perf_counter()
        metrics = {key: float(np.mean([m[key] for m in host_steps])) for key in host_steps[0]}
        metrics.update({key: float(value) for key, value in host_prepare.items()})
        metrics.update(score_metrics)
        metrics.update(generation_s=generated - clock, scoring_s=scored - generated, training_s=trained - scored,
                       weight_sync_s=0.0, optimizer_steps=float(len(host_steps)))
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
