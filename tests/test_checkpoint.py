"""Checkpointer: the best checkpoint is chosen by the validation metric, also after reopening."""

import jax.numpy as jnp

from lclsc_jax.train.checkpoint import Checkpointer


def test_best_step_follows_the_metric_not_the_latest(tmp_path):
    c = Checkpointer(str(tmp_path), keep_last=2, best_metric="val_accuracy")
    for step, acc in [(10, 0.5), (20, 0.9), (30, 0.6), (40, None), (50, 0.7)]:
        c.save(step, {"w": jnp.full(3, float(step))}, metrics=None if acc is None else {"val_accuracy": acc})
    c.wait()
    assert c.best_step() == 20  # the highest val_accuracy, not the latest (50)
    assert c.latest_step() == 50
    assert sorted(c.manager.all_steps()) == [20, 40, 50]  # best + the last two
    c.close()
    reopened = Checkpointer(str(tmp_path), keep_last=2, best_metric="val_accuracy")
    assert reopened.best_step() == 20
    reopened.close()


def test_min_mode_and_no_metric(tmp_path):
    c = Checkpointer(str(tmp_path / "a"), keep_last=1, best_metric="val_loss", best_mode="min")
    for step, loss in [(1, 0.3), (2, 0.1), (3, 0.2)]:
        c.save(step, {"w": jnp.zeros(1)}, metrics={"val_loss": loss})
    c.wait()
    assert c.best_step() == 2
    c.close()
    plain = Checkpointer(str(tmp_path / "b"), keep_last=1, best_metric=None)
    plain.save(5, {"w": jnp.zeros(1)})
    plain.wait()
    assert plain.best_step() == plain.latest_step() == 5
    plain.close()
