"""The RLVR programs on the training mesh (RECIPE.md "RLVR"): what a rollout turns into (`build_prepare_fn`) and the
PPO / GRPO train step over it (`build_ppo_step`).

- `prepare(policy, value, frozen, prompt_ids, prompt_mask, response, lengths, finished, verifier_scores,
  response_logps)`: one jitted program that lays prompt + response out as a `RolloutBatch` [B, P + N] and computes,
  without gradients, the policy's old log-probs (the sampler's own `response_logps` at temperature 1, else a
  forward pass; `RLVRSection.old_logps_from_sampler`), the frozen reference's log-probs (`frozen["reference"]`, a
  jit ARGUMENT), the value model's values, the per-token rewards (α·verifier − the non-stop penalty at the last
  response token, −β·k1 KL on every response token), GAE (γ, λ) and whitened advantages. GRPO instead: group
  advantages of the sequence scores, zero-variance groups dropped (their tokens leave the loss mask) and counted,
  no value model, and each group's prompt run once (`RLVRSection.share_prompts`).
- `step(state, batch, frozen) -> (state, metrics)` on a `MultiTrainState` {"policy", "value"} (GRPO: {"policy"}):
  the clipped policy loss (GRPO: + β·k3 KL to `batch.ref_logps`) updates the policy with its optimizer, the
  clipped value loss × vf_coef updates the value model with its own; both token-normalized by the global number
  of response tokens of the minibatch, so gradient accumulation over micro-batches is exact.

Alignment: slot t of every per-token field belongs to token t, predicted from positions < t: log π(tokens[t] |
tokens[<t]) is read from the logits at t − 1 and the value V_t from the hidden state at t − 1 (open-instruct's
`value[:, context_length - 1 : -1]`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, Literal

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from tulu_jax.errors import ConfigError
from tulu_jax.losses.common import masked_sum, safe_denominator
from tulu_jax.losses.ppo import (
    explained_variance,
    gae,
    grpo_policy_loss,
    kl_estimate,
    ppo_policy_loss,
    ppo_value_loss,
    whiten,
)
from tulu_jax.rl.rewards import grpo_token_advantages, sequence_scores, token_rewards
from tulu_jax.train.batches import RolloutBatch
from tulu_jax.train.guard import SKIPPED_METRIC, guard_nonfinite
from tulu_jax.train.multi import MultiTrainState
from tulu_jax.train.optim import Optimizer
from tulu_jax.train.step import Step, apply_gradients, split_micro_batches

PyTree = Any
POLICY, VALUE, REFERENCE = "policy", "value", "reference"


@dataclasses.dataclass
class RLVRSection:
    """The RL algorithm (RECIPE.md "RLVR"; defaults are the Tülu 3 8B recipe's).

    algorithm: ppo (value model, GAE) | grpo (group advantages, no value model). kl_coef β: the k1 penalty in the
    PPO reward, the k3 term in the GRPO loss. alpha: verifier reward multiplier; non_stop_penalty: the score of a
    response cut off without EOS (null: none). gamma, lam: GAE. clip: policy ratio clip; vf_clip: value clip;
    vf_coef: value-loss weight. whiten_advantages: PPO advantages whitened over the batch. group_size G: GRPO
    samples per prompt (PPO: 1). ppo_epochs K and num_minibatches: passes over each rollout batch and the shuffled
    minibatches (optimizer steps) per pass. max_new_tokens: response length; temperature: of the rollouts.
    reuse_sampler_logps: at temperature 1 the old log-probs are the sampler's own (the same parameters; equal to a
    forward pass over prompt + response within float32 rounding, tests/test_rlvr_stage.py), which saves the policy
    forward of every rollout; false recomputes them like open-instruct, whose vLLM sampler differs numerically.
    rollout_chunks: the rollout batch is generated in this many row blocks; overlap_scoring: chunk k is scored
    while chunk k + 1 is generated (`tulu_jax.rl.loop`). share_prompts (GRPO): the forward passes of prepare and
    step run each group's prompt once and attend every response to it (`Decoder.shared_prompt_token_logps`; the
    same log-probs, B/G·P + B·N tokens instead of B·(P + N)); minibatches and micro-batches are then whole groups.
    rollout_prompts (GRPO; DAPO's dynamic sampling): prompts sampled per iteration, more than the
    train.global_batch_size / group_size groups an iteration trains on; the trained groups are those whose scores
    differ first (a zero-variance group carries no GRPO signal), then the rest (null: sample exactly the trained
    groups).
    value_init: policy (the policy's backbone and a fresh head) | reward_model (value_model_path, an RM export).
    """

    algorithm: Literal["ppo", "grpo"] = "ppo"
    kl_coef: float = 0.05
    alpha: float = 10.0
    non_stop_penalty: float | None = -10.0
    gamma: float = 1.0
    lam: float = 0.95
    clip: float = 0.2
    vf_clip: float = 0.2
    vf_coef: float = 0.1
    whiten_advantages: bool = True
    group_size: int = 1
    ppo_epochs: int = 4
    num_minibatches: int = 1
    max_new_tokens: int = 2048
    temperature: float = 1.0
    reuse_sampler_logps: bool = True
    rollout_chunks: int = 1
    overlap_scoring: bool = True
    share_prompts: bool = True
    rollout_prompts: int | None = None
    value_init: Literal["policy", "reward_model"] = "policy"
    value_model_path: str | None = None
    value_lr: float | None = None

    def __post_init__(self) -> None:
        for key in ("group_size", "ppo_epochs", "num_minibatches", "max_new_tokens", "rollout_chunks"):
            if getattr(self, key) < 1:
                raise ValueError(f"'rlvr.{key}' must be >= 1, got {getattr(self, key)}")
        for key in ("kl_coef", "clip", "vf_clip", "vf_coef", "temperature"):
            if getattr(self, key) < 0:
                raise ValueError(f"'rlvr.{key}' must be >= 0, got {getattr(self, key)}")
        if self.rollout_prompts is not None and self.rollout_prompts < 1:
            raise ValueError(f"'rlvr.rollout_prompts' must be >= 1, got {self.rollout_prompts}")
        if self.algorithm == "grpo" and self.group_size < 2:
            raise ValueError("'rlvr.group_size' must be >= 2 for grpo (advantages are relative to the group)")
        if self.value_init == "reward_model" and self.value_model_path is None:
            raise ValueError("'rlvr.value_init: reward_model' needs 'rlvr.value_model_path' (an RM export)")

    @property
    def old_logps_from_sampler(self) -> bool:
        """Whether the old log-probs are the sampler's (at temperature 1 it samples π itself) or recomputed."""
        return self.reuse_sampler_logps and self.temperature == 1.0

    @property
    def prompt_group(self) -> int:
        """Rows per shared prompt in the training forward passes: group_size under GRPO's share_prompts, else 1."""
        return self.group_size if self.algorithm == "grpo" and self.share_prompts else 1

    @property
    def response_width(self) -> int:
        """Columns of the rollout's response block (`tulu_jax.rl.rollout.Rollout` returns max_new_tokens)."""
        return self.max_new_tokens

    @property
    def uses_value(self) -> bool:
        """Whether the algorithm trains a value model (PPO) or not (GRPO)."""
        return self.algorithm == "ppo"


def _shift(x: jax.Array) -> jax.Array:
    """[B, T] → slot t holds x[:, t − 1] (slot 0: 0): the prediction made before token t, moved onto token t."""
    return jnp.pad(x[:, :-1], ((0, 0), (1, 0)))


def policy_logps(model: nnx.Module, batch: RolloutBatch, *, entropy: bool = False, prompt_group: int = 1,
                 response_width: int = 0) -> tuple[jax.Array, jax.Array]:
    """(log π(tokens[t] | tokens[<t]) [B, T] float32, 0 in slot 0; per-token entropy of that distribution [B, T],
    without gradient, or zeros unless `entropy`). With `prompt_group` > 1 the rows share their prompt in groups of
    that many and only the last `response_width` slots are computed (`Decoder.shared_prompt_token_logps`), the
    prompt's slots are 0."""
    if prompt_group > 1:
        width = batch.tokens.shape[1] - response_width
        out = model.shared_prompt_token_logps(batch.tokens, batch.positions, batch.segment_ids, prompt_width=width,
                                              group_size=prompt_group, entropy=entropy)
        logps, ent = out if entropy else (out, jnp.zeros(out.shape, jnp.float32))
        prompt_slots = ((0, 0), (width, 0))
        return jnp.pad(logps, prompt_slots), jnp.pad(jax.lax.stop_gradient(ent), prompt_slots)
    # Position t predicts token t + 1 (the last position's target is a dummy, shifted out below); the decoder
    # computes it in sequence chunks, never holding the full float32 logits.
    targets = jnp.pad(batch.tokens[:, 1:], ((0, 0), (0, 1)))
    out = model.token_logps(batch.tokens, targets, positions=batch.positions, segment_ids=batch.segment_ids,
                            entropy=entropy)
    logps, ent = out if entropy else (out, jnp.zeros(targets.shape, jnp.float32))
    return _shift(logps), _shift(jax.lax.stop_gradient(ent))


def value_estimates(model: nnx.Module, batch: RolloutBatch) -> jax.Array:
    """V_t [B, T] float32: the value model's scalar at position t − 1 (the state before token t)."""
    return _shift(model(batch.tokens, positions=batch.positions, segment_ids=batch.segment_ids))


def rollout_layout(prompt_ids: jax.Array, prompt_mask: jax.Array, response: jax.Array,
                   lengths: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """(tokens, positions, segment_ids, response_mask) [B, P + N] of left-padded prompts followed by responses of
    `lengths` tokens (stop token included) and their padding."""
    sampled = jnp.arange(response.shape[1])[None, :] < lengths[:, None]
    tokens = jnp.concatenate([prompt_ids, response], axis=1).astype(jnp.int32)
    segment_ids = jnp.concatenate([prompt_mask, sampled], axis=1).astype(jnp.int32)
    positions = jnp.maximum(jnp.cumsum(segment_ids, axis=1, dtype=jnp.int32) - 1, 0)
    response_mask = jnp.concatenate([jnp.zeros_like(prompt_mask, bool), sampled], axis=1)
    return tokens, positions, segment_ids, response_mask


def _mean(x: jax.Array) -> jax.Array:
    return jnp.mean(x.astype(jnp.float32))


def build_prepare_fn(
    policy_graphdef: nnx.GraphDef,
    value_graphdef: nnx.GraphDef | None,
    rl: RLVRSection,
    *,
    model_shardings: Mapping[str, Any],
    frozen_shardings: PyTree,
    batch_sharding: NamedSharding,
) -> Callable[..., tuple[RolloutBatch, dict[str, jax.Array]]]:
    """The jitted rollout → `RolloutBatch` program (module docstring) and its metrics.

    `model_shardings[name]`: the (params, model_state) shardings of each trained model (the train state's own, so
    nothing is copied or resharded); call it as `prepare({"policy": (params, model_state), "value": ...}, frozen,
    prompt_ids, prompt_mask, response, lengths, finished, verifier_scores, response_logps)` (`response_logps`
    [B, N]: the sampler's log-probs, read only when `rl.old_logps_from_sampler`).
    Metrics: score (the sequence score), verifier (mean verifier score), non_stop_rate, response_length, kl_to_ref
    (Σ_t k1 per sequence, mean), entropy (per response token; only when the old log-probs are recomputed, else the
    step's), explained_variance (PPO: old values vs returns), grpo_dropped_groups (GRPO).
    """
    if rl.uses_value and value_graphdef is None:
        raise ConfigError("ppo needs a value model")
    row = NamedSharding(batch_sharding.mesh, PartitionSpec(batch_sharding.spec[0]))
    replicated = NamedSharding(batch_sharding.mesh, PartitionSpec())

    grouping = {"prompt_group": rl.prompt_group, "response_width": rl.response_width}

    def prepare(models, frozen, prompt_ids, prompt_mask, response, lengths, finished, verifier_scores,
                response_logps):
        if rl.prompt_group > 1 and response.shape[1] != rl.response_width:
            raise ValueError(f"shared prompts: the response block has {response.shape[1]} columns, not "
                             f"rlvr.max_new_tokens={rl.max_new_tokens}")
        tokens, positions, segment_ids, mask = rollout_layout(prompt_ids, prompt_mask, response, lengths)
        zeros = jnp.zeros(tokens.shape, jnp.float32)
        layout = RolloutBatch(tokens, positions, segment_ids, mask, *([zeros] * 6))
        metrics = {}
        if rl.old_logps_from_sampler:
            old = jnp.concatenate([jnp.zeros(prompt_ids.shape, jnp.float32), response_logps.astype(jnp.float32)], 1)
        else:
            old, entropy = policy_logps(nnx.merge(policy_graphdef, *models[POLICY]), layout, entropy=True,
                                        **grouping)
            metrics["entropy"] = masked_sum(entropy, mask) / safe_denominator(jnp.sum(mask))
        ref, _ = policy_logps(frozen[REFERENCE].model(), layout, **grouping)
        old, ref = jnp.where(mask, old, 0.0), jnp.where(mask, ref, 0.0)
        scores = sequence_scores(verifier_scores, finished, alpha=rl.alpha, non_stop_penalty=rl.non_stop_penalty)
        kl = jnp.where(mask, kl_estimate(old, ref, "k1"), 0.0)
        num_tokens = safe_denominator(jnp.sum(mask))
        metrics.update({
            "score": _mean(scores), "verifier": _mean(verifier_scores), "non_stop_rate": 1.0 - _mean(finished),
            "response_length": _mean(lengths), "kl_to_ref": _mean(jnp.sum(kl, axis=1)),
        })
        if rl.uses_value:
            values = jnp.where(mask, value_estimates(nnx.merge(value_graphdef, *models[VALUE]), layout), 0.0)
            rewards = token_rewards(scores, kl, mask, kl_coef=rl.kl_coef)
            advantages, returns = gae(rewards, values, mask, gamma=rl.gamma, lam=rl.lam)
            if rl.whiten_advantages:
                advantages = whiten(advantages, mask)
            metrics["explained_variance"] = explained_variance(values, returns, mask)
            metrics["value_mean"] = masked_sum(values, mask) / num_tokens
        else:
            values = returns = zeros
            rewards = token_rewards(scores, kl, mask, kl_coef=0.0)
            advantages, mask, dropped = grpo_token_advantages(scores, mask, rl.group_size)
            metrics["grpo_dropped_groups"] = dropped
        batch = RolloutBatch(tokens, positions, segment_ids, mask, old, ref, values, rewards, advantages, returns)
        return batch, metrics

    member_shardings = {name: model_shardings[name] for name in ((POLICY, VALUE) if rl.uses_value else (POLICY,))}
    return jax.jit(
        prepare,
        in_shardings=(member_shardings, frozen_shardings, batch_sharding, batch_sharding, batch_sharding, row, row,
                      row, batch_sharding),
        out_shardings=(RolloutBatch(*([batch_sharding] * len(RolloutBatch.__dataclass_fields__))), replicated),
    )


def _accumulated_grads(loss_fn: Callable, params: nnx.State, batch: RolloutBatch, accum: int,
                       batch_shardings: PyTree, param_shardings: PyTree,
                       group: int = 1) -> tuple[nnx.State, dict[str, jax.Array]]:
    """Σ over `accum` strided micro-batches of (∇ loss, metrics) (float32); the losses share global denominators.
    With `group` > 1 a micro-batch is whole groups of that many consecutive rows (strided over the groups)."""
    grad_fn = jax.grad(loss_fn, has_aux=True)
    if accum == 1:
        grads, metrics = grad_fn(params, batch)
        return jax.tree.map(lambda g: g.astype(jnp.float32), grads), metrics

    def rows_of(x: jax.Array) -> jax.Array:  # [groups, G, ...] → [groups·G, ...]
        return x.reshape(-1, *x.shape[2:])

    if group > 1:
        batch = jax.tree.map(lambda x: x.reshape(x.shape[0] // group, group, *x.shape[1:]), batch)

    def body(grad_sum, micro_batch):
        if group > 1:
            micro_batch = jax.tree.map(rows_of, micro_batch)
        grads, metrics = grad_fn(params, micro_batch)
        grad_sum = jax.tree.map(lambda a, g: a + g.astype(jnp.float32), grad_sum, grads)
        return jax.lax.with_sharding_constraint(grad_sum, param_shardings), metrics

    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
    grads, stacked = jax.lax.scan(body, zeros, split_micro_batches(batch, accum, batch_shardings))
    return grads, jax.tree.map(lambda x: jnp.sum(x, axis=0), stacked)


def build_ppo_step(
    optimizers: Mapping[str, Optimizer],
    rl: RLVRSection,
    *,
    state_shardings: MultiTrainState,
    batch_shardings: RolloutBatch,
    frozen_shardings: PyTree = None,
    grad_accum_steps: int = 1,
) -> Step:
    """The jitted, state-donating `(MultiTrainState, RolloutBatch minibatch, frozen) -> (state, metrics)`.

    metrics: policy_loss, clipfrac, approx_kl, entropy (GRPO: kl, the k3 term), policy_grad_norm, policy_lr; PPO
    also value_loss (before vf_coef), value_clipfrac, value_grad_norm, value_lr; loss (policy + vf_coef·value).
    Each member's update is guarded like the SFT/DPO steps' (`tulu_jax.train.guard`): a non-finite loss or gradient
    norm of that member keeps its parameters and optimizer state (`policy_skipped_nonfinite`,
    `value_skipped_nonfinite`; `skipped_nonfinite` is 1 when either was skipped).
    `frozen` is not read by the step (the reference log-probs are in the batch); it is accepted for the contract.
    """
    names = (POLICY, VALUE) if rl.uses_value else (POLICY,)

    def step(state: MultiTrainState, batch: RolloutBatch, frozen: PyTree):
        del frozen
        mask = batch.response_mask
        num_tokens = jnp.sum(mask, dtype=jnp.int32)  # the minibatch's, shared by every micro-batch
        policy_member = state.models[POLICY]

        def policy_loss(params, mb):
            model = nnx.merge(policy_member.graphdef, params, policy_member.model_state)
            logps, entropy = policy_logps(model, mb, entropy=True, prompt_group=rl.prompt_group,
                                          response_width=rl.response_width)
            if rl.algorithm == "grpo":
                loss, m = grpo_policy_loss(logps, mb.old_logps, mb.ref_logps, mb.advantages, mb.response_mask,
                                           clip=rl.clip, kl_coef=rl.kl_coef, num_tokens=num_tokens)
                m = {k: v for k, v in m.items() if k != "loss"}
            else:
                loss, m = ppo_policy_loss(logps, mb.old_logps, mb.advantages, mb.response_mask, clip=rl.clip,
                                          num_tokens=num_tokens)
                m = {**m, "policy_loss": m.pop("loss")}
            m["entropy"] = masked_sum(entropy, mb.response_mask) / safe_denominator(num_tokens)
            return loss, m

        grads, metrics = _accumulated_grads(policy_loss, policy_member.params, batch, grad_accum_steps,
                                            batch_shardings, state_shardings.models[POLICY].params, rl.prompt_group)
        models = dict(state.models)
        updated, metrics["policy_grad_norm"] = apply_gradients(policy_member, grads, optimizers[POLICY])
        models[POLICY], skipped = guard_nonfinite(policy_member, updated, metrics["policy_loss"],
                                                  metrics["policy_grad_norm"])
        metrics["policy_skipped_nonfinite"] = skipped
        metrics["policy_lr"] = optimizers[POLICY].schedule(policy_member.step)
        metrics["loss"] = metrics["policy_loss"]
        if rl.uses_value:
            value_member = state.models[VALUE]

            def value_loss(params, mb):
                model = nnx.merge(value_member.graphdef, params, value_member.model_state)
                loss, m = ppo_value_loss(value_estimates(model, mb), mb.values, mb.returns, mb.response_mask,
                                         clip=rl.vf_clip, num_tokens=num_tokens)
                return rl.vf_coef * loss, {"value_loss": m["loss"], "value_clipfrac": m["clipfrac"]}

            grads, value_metrics = _accumulated_grads(value_loss, value_member.params, batch, grad_accum_steps,
                                                      batch_shardings, state_shardings.models[VALUE].params)
            updated, value_metrics["value_grad_norm"] = apply_gradients(value_member, grads, optimizers[VALUE])
            models[VALUE], value_metrics["value_skipped_nonfinite"] = guard_nonfinite(
                value_member, updated, value_metrics["value_loss"], value_metrics["value_grad_norm"])
            skipped = jnp.maximum(skipped, value_metrics["value_skipped_nonfinite"])
            value_metrics["value_lr"] = optimizers[VALUE].schedule(value_member.step)
            metrics.update(value_metrics)
            metrics["loss"] = metrics["loss"] + rl.vf_coef * metrics["value_loss"]
        metrics["response_tokens"] = num_tokens
        metrics[SKIPPED_METRIC] = skipped
        return state.replace(models=models, step=state.step + 1), metrics

    if set(names) != set(state_shardings.models):
        raise ConfigError(f"{rl.algorithm} trains {list(names)}, the state holds {sorted(state_shardings.models)}")
    replicated = NamedSharding(state_shardings.step.mesh, PartitionSpec())
    return Step(jax.jit(
        step,
        in_shardings=(state_shardings, batch_shardings, frozen_shardings),
        out_shardings=(state_shardings, replicated),
        donate_argnums=(0,),
    ))


def build_select_rows(batch_shardings: RolloutBatch) -> Callable[[RolloutBatch, jax.Array], RolloutBatch]:
    """Jitted `(batch, rows int32 [M]) -> batch[rows]` (a shuffled minibatch), laid out like the batch."""
    replicated = NamedSharding(batch_shardings.tokens.mesh, PartitionSpec())
    return jax.jit(lambda batch, rows: jax.tree.map(lambda x: jnp.take(x, rows, axis=0), batch),
                   in_shardings=(batch_shardings, replicated), out_shardings=batch_shardings)
