"""Fit a block-sparse linear map with optax inside a jitted training loop.

A teacher ``W* (1024 x 1024)`` with 90% block sparsity (32 x 32 blocks) generates
noisy targets ``Y = X @ W* + noise``. A student BCSR with the teacher's pattern but
zero values is trained with Adam on minibatches; the optimizer state is sized by
the stored blocks, not the dense shape. The loss falls to the noise floor and the
relative error of the recovered weights is printed.

    python examples/least_squares.py [--steps 300]
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import optax

import jsparse


def main(steps: int = 300, dim: int = 1024, batch: int = 256, seed: int = 0) -> float:
    k_w, k_x = jax.random.split(jax.random.key(seed))
    teacher = jsparse.BCSR.random(k_w, (dim, dim), density=0.1, block_shape=(32, 32))
    teacher = teacher / jnp.sqrt(dim * teacher.density)  # unit-variance outputs
    student = teacher.with_values(jnp.zeros_like(teacher.data))

    optimizer = optax.adam(1e-2)
    opt_state = optimizer.init(student.data)  # (nse, 32, 32): 10% of a dense state

    def loss_fn(data, x, y):
        pred = x @ student.with_values(data)
        return jnp.mean((pred - y) ** 2)

    @jax.jit
    def train_step(data, opt_state, key):
        kx, kn = jax.random.split(key)
        x = jax.random.normal(kx, (batch, dim))
        y = x @ teacher + 0.01 * jax.random.normal(kn, (batch, dim))
        loss, grad = jax.value_and_grad(loss_fn)(data, x, y)
        updates, opt_state = optimizer.update(grad, opt_state)
        return optax.apply_updates(data, updates), opt_state, loss

    data = student.data
    start = time.perf_counter()
    for step, key in enumerate(jax.random.split(k_x, steps)):
        data, opt_state, loss = train_step(data, opt_state, key)
        if step % max(1, steps // 10) == 0 or step == steps - 1:
            print(f"step {step:4d}  loss {float(loss):.3e}")
    elapsed = time.perf_counter() - start
    err = jnp.linalg.norm(data - teacher.data) / jnp.linalg.norm(teacher.data)
    print(
        f"{steps} steps in {elapsed:.1f}s; relative weight error {float(err):.2e}; "
        f"weights {student.nbytes / 2**20:.2f} MiB sparse vs {dim * dim * 4 / 2**20:.2f} MiB dense"
    )
    return float(err)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args()
    main(steps=args.steps)
