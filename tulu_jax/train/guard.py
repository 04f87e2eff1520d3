"""The in-step guard against non-finite values: an update with a NaN/inf loss or gradient norm is skipped.

Inside the jitted train step, `guard_nonfinite` keeps the previous parameters, model variables and optimizer
state when the loss or the gradient norm is not finite (the step counter still advances:
the batch was consumed), and reports `skipped_nonfinite` (1 or 0) in the step's metrics. No host sync: the loop
reads the flag with the other metrics, and its `NonfiniteCounter` stops the run after `max_nonfinite_steps`
consecutive skipped steps.

Outside the step, `tulu_jax.finite.nonfinite_leaves` names the arrays holding NaN or inf: saves, exports and
model loads refuse them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp

from tulu_jax.errors import TrainingError
from tulu_jax.train.state import TrainState

if TYPE_CHECKING:
    from tulu_jax.train.checkpoint import Checkpointer

PyTree = Any
SKIPPED_METRIC = "skipped_nonfinite"


def guard_nonfinite(
    old: TrainState, new: TrainState, loss: jax.Array, grad_norm: jax.Array
) -> tuple[TrainState, jax.Array]:
    """(`new`, 0), or `old` with `new`'s step counter and 1 when the loss or the gradient norm is not finite
    (traced, in-jit).

    Only values known before the update decide, so XLA can fuse the choice into the update and alias the donated
    buffers (no second copy of the parameters and moments). Parameters that a finite update overflows make the
    next step's loss non-finite, and are never saved (`Checkpointer.save` refuses them).
    """
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    kept = jax.tree.map(
        lambda n, o: jnp.where(finite, n, o),
        (new.params, new.model_state, new.opt_state),
        (old.params, old.model_state, old.opt_state),
    )
    guarded = new.replace(params=kept[0], model_state=kept[1], opt_state=kept[2])
    return guarded, jnp.where(finite, 0, 1).astype(jnp.int32)


class NonfiniteCounter:
    """Counts consecutive steps the train step skipped (from fetched metrics); raises TrainingError naming the
    step and the newest checkpoint at `limit`."""

    def __init__(self, limit: int, checkpointer: "Checkpointer | None"):
        if limit < 1:
            raise ValueError(f"max_nonfinite_steps must be >= 1, got {limit}")
        self.limit, self.checkpointer, self.count = limit, checkpointer, 0

    def record(self, step: int, metrics: dict[str, Any]) -> None:
        """Account for one fetched step's metrics."""
        if not int(metrics.get(SKIPPED_METRIC, 0)):
            self.count = 0
            return
        self.count += 1
        if self.count < self.limit:
            return
        if self.checkpointer is not None:
            self.checkpointer.wait()  # a save started before this step may still be finishing
        latest = self.checkpointer.latest_step() if self.checkpointer is not None else None
        where = (
            f"the newest finite checkpoint is {self.checkpointer.directory}/{latest}"
            if latest is not None else "there is no checkpoint"
        )
        raise TrainingError(
            f"step {step}: {self.count} consecutive non-finite steps (loss {float(metrics['loss'])}, grad_norm "
            f"{float(metrics['grad_norm'])}); their updates were skipped and the run stops; {where} "
            "(lower optim.lr, or check the data)"
        )
