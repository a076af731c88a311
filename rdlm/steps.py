"""Pure, jitted steps: training with the paper's randomized depth, and validation loss at a given r."""

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from rdlm import metrics as metrics_lib
from rdlm import numerics
from rdlm.model import RecurrentLM, sample_num_steps
from rdlm.state import TrainState

# Streams folded into the run's rng, so each use draws independently.
_DEPTH_STREAM, _STATE_STREAM = 0, 1


class _States(NamedTuple):
    state: jax.Array
    prev_state: jax.Array


def depth_for_step(recurrence, rng, step):
    """(n, k) for an optimizer step: the paper's draw, or `recurrence.fixed` iterations all with gradient."""
    if recurrence.fixed > 0:
        return jnp.int32(0), jnp.int32(recurrence.fixed)
    return sample_num_steps(jax.random.fold_in(rng, _DEPTH_STREAM), step, recurrence.mean, recurrence.backprop, recurrence.sigma)


def weighted_loss(model: RecurrentLM, params, batch, num_steps, state_rng, init_scale: float = 1.0):
    """(sum of weighted token cross-entropy, (sum of weights, model output))."""
    out = model.apply(
        {"params": params},
        batch["inputs"],
        num_steps=num_steps,
        positions=batch["positions"],
        segment_ids=batch["segment_ids"],
        init_scale=init_scale,
        rngs={"state": state_rng},
    )
    ce = optax.softmax_cross_entropy_with_integer_labels(out.logits, batch["targets"])
    return jnp.sum(ce * batch["weights"]), (jnp.sum(batch["weights"]), out)


def make_train_step(model: RecurrentLM, tx, schedule, recurrence, grad_accum_steps: int) -> Callable:
    """`train_step(state, batch, rng) -> (state, metrics)`; with accumulation the batch has a leading micro-batch
    axis. `rng` is the run's raw key data (`TrainProgram.key`): an argument, so runs that differ only in their seed share one
    compiled step.

    One depth (n, k) is drawn per optimizer step from the run's rng and the step number, so every
    host and every micro-batch uses the same r; k is traced (at most `recurrence.backprop`). A step
    whose loss or gradient norm is not finite applies no update (rdlm.numerics) and reports `finite = 0`.
    """

    def grads_of(params, batch, n, k, state_rng):
        loss = lambda p: weighted_loss(model, p, batch, (n, k), state_rng, recurrence.init_scale)  # noqa: E731
        fn = jax.value_and_grad(loss, has_aux=True)
        (loss_sum, (weight_sum, out)), grads = fn(params)
        return loss_sum, weight_sum, grads, out

    def train_step(state: TrainState, batch, rng) -> tuple[TrainState, dict]:
        rng = jax.random.wrap_key_data(rng)
        n, k = depth_for_step(recurrence, rng, state.step)
        state_rng = jax.random.fold_in(jax.random.fold_in(rng, _STATE_STREAM), state.step)
        if grad_accum_steps == 1:
            loss_sum, weight_sum, grads, out = grads_of(state.params, batch, n, k, state_rng)
        else:

            def micro(carry, xs):
                i, micro_batch = xs
                loss_sum, weight_sum, grads, out = grads_of(state.params, micro_batch, n, k, jax.random.fold_in(state_rng, i))
                acc_loss, acc_weight, acc_grads, _ = carry
                acc_grads = jax.tree.map(jnp.add, acc_grads, grads)
                return (acc_loss + loss_sum, acc_weight + weight_sum, acc_grads, (out.state, out.prev_state)), None

            zeros = jax.tree.map(jnp.zeros_like, state.params)
            shape = batch["inputs"].shape[1:] + (model.config.n_embd,)
            no_state = jnp.zeros(shape, model.config.compute_dtype)
            indices = jnp.arange(grad_accum_steps)
            carry = (0.0, 0.0, zeros, (no_state, no_state))  # only the last micro-batch's states are kept
            (loss_sum, weight_sum, grads, last), _ = jax.lax.scan(micro, carry, (indices, batch))
            out = _States(*last)
        denominator = jnp.maximum(weight_sum, 1.0)
        grads = jax.tree.map(lambda g: g / denominator, grads)
        loss, grad_norm = loss_sum / denominator, optax.global_norm(grads)
        finite = numerics.finite_step(loss, grad_norm)

        def apply():
            updates, opt_state = tx.update(grads, state.opt_state, state.params)
            return optax.apply_updates(state.params, updates), opt_state, metrics_lib.rms(updates)

        def keep():  # a non-finite step changes nothing but the step count
            return state.params, state.opt_state, jnp.zeros((), jnp.float32)

        params, opt_state, update_rms = numerics.apply_if_finite(finite, apply, keep)
        metrics = {
            "loss": loss,
            "grad_norm": grad_norm,
            "finite": finite.astype(jnp.int32),
            "update_rms": update_rms,
            "param_rms": metrics_lib.rms(params),
            "lr": schedule(state.step),
            "num_steps": n + k,
            "num_steps_no_grad": n,
            "loss_tokens": weight_sum,
            "token_correlation": metrics_lib.token_correlation(out.state.astype(jnp.float32)),
            "state_change": metrics_lib.relative_state_change(out.state.astype(jnp.float32), out.prev_state.astype(jnp.float32)),
        }
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

    return train_step


def make_eval_step(model: RecurrentLM, init_scale: float) -> Callable:
    """`eval_step(params, batch, num_steps, rng) -> (loss sum, weight sum)`; num_steps is traced (one compile)."""

    def eval_step(params, batch, num_steps, rng):
        loss_sum, (weight_sum, _) = weighted_loss(model, params, batch, num_steps, rng, init_scale)
        return loss_sum, weight_sum

    return eval_step
