"""All checkpoint code: an Orbax ``CheckpointManager`` holding the train state and the data iterator.

Layout: ``WORKDIR/checkpoints/<step>/{state,data_iter}``. Kept: the last ``keep_last`` and the
best by a validation metric. Saves are asynchronous; :meth:`Checkpointer.close` waits for them.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as ocm


class _DropNoMetricsWarning(logging.Filter):
    """Checkpoints between validations carry no metrics by design; Orbax warns about each one."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "did not provide metrics" not in str(record.msg)


logging.getLogger("absl").addFilter(_DropNoMetricsWarning())


class Checkpointer:
    """Save / restore ``(state, data iterator)`` pairs in ``directory``."""

    def __init__(self, directory: str, keep_last: int = 2, best_metric: str | None = "accuracy",
                 best_mode: str = "max", async_save: bool = True):
        policies: list[Any] = [ocm.LatestN(n=keep_last)]
        if best_metric:
            policies.append(ocm.BestN(get_metric_fn=lambda m: m[best_metric], reverse=best_mode == "min",
                                      n=1, keep_checkpoints_without_metrics=False))
        self.best_metric = best_metric
        # best_fn makes Orbax store the metrics with each checkpoint and rank them in best_step();
        # without it best_step() silently returned the latest step.
        options = ocp.CheckpointManagerOptions(
            preservation_policy=ocm.AnyPreservationPolicy(policies),
            best_fn=(lambda m: m[best_metric]) if best_metric else None, best_mode=best_mode,
            enable_async_checkpointing=async_save, create=True)
        self.manager = ocp.CheckpointManager(os.path.abspath(directory), options=options,
                                             item_names=("state", "data_iter"))

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step, or None."""
        return self.manager.latest_step()

    def best_step(self) -> int | None:
        """The step of the best checkpoint by the metric (falls back to the latest)."""
        try:
            best = self.manager.best_step()
        except Exception:  # noqa: BLE001 - no metrics recorded yet
            best = None
        return best if best is not None else self.latest_step()

    def save(self, step: int, state: Any, data_iter: Any | None = None,
             metrics: dict[str, float] | None = None) -> None:
        """Save ``state`` (and the iterator's position) at ``step``; asynchronous."""
        items = {"state": ocp.args.StandardSave(state)}
        if data_iter is not None:
            items["data_iter"] = grain.checkpoint.CheckpointSave(data_iter)
        self.manager.save(step, args=ocp.args.Composite(**items), metrics=metrics, force=True)

    def restore(self, step: int, abstract_state: Any, data_iter: Any | None = None) -> Any:
        """Restore the state at ``step`` into ``abstract_state``'s shapes and shardings.

        When ``data_iter`` is given, its position is restored in place too.
        """
        items = {"state": ocp.args.StandardRestore(abstract_state)}
        if data_iter is not None:
            items["data_iter"] = grain.checkpoint.CheckpointRestore(data_iter)
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        return restored["state"]

    def wait(self) -> None:
        """Block until pending asynchronous saves are on disk."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        """Wait for pending saves and release resources."""
        self.manager.wait_until_finished()
        self.manager.close()


def abstract_like(state: Any, sharding: jax.sharding.Sharding) -> Any:
    """``ShapeDtypeStruct`` tree of ``state`` (arrays or shapes) carrying ``sharding``."""
    return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), state)
