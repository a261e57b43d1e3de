"""Schedules of sparse training: the cubic sparsity ramp of gradual magnitude pruning
(Zhu & Gupta, 2017) and the cosine-decayed drop fraction of RigL (Evci et al., 2020).

Both are frozen dataclasses; calling one with a step (a Python int or a traced array)
gives the value at that step, and :meth:`is_update_step` says (in Python) whether the
pattern changes at that step. ``step`` counts optimizer steps already taken (the value
of ``nnx.Optimizer.step`` after the step).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

__all__ = ["CosineDropFraction", "CubicSparsitySchedule"]


def _check_fraction(name: str, value: float, *, closed: bool = False) -> float:
    value = float(value)
    ok = 0.0 <= value <= 1.0 if closed else 0.0 <= value < 1.0
    if not ok:
        interval = "[0, 1]" if closed else "[0, 1)"
        raise ValueError(f"{name} must be in {interval}, got {value}")
    return value


def _check_steps(begin_step: int, end_step: int, frequency: int) -> None:
    if int(begin_step) < 0:
        raise ValueError(f"begin_step must be >= 0, got {begin_step}")
    if int(end_step) <= int(begin_step):
        raise ValueError(f"end_step ({end_step}) must come after begin_step ({begin_step})")
    if int(frequency) <= 0:
        raise ValueError(f"frequency must be a positive number of steps, got {frequency}")


@dataclasses.dataclass(frozen=True)
class CubicSparsitySchedule:
    """The gradual pruning schedule of Zhu & Gupta (2017), "To prune, or not to prune".

    ``s(t) = s_f + (s_i - s_f) * (1 - (t - t0) / (t1 - t0)) ** 3`` for ``t0 <= t <= t1``;
    ``s_i`` before ``t0`` and ``s_f`` after ``t1``. Pruning happens every ``frequency``
    steps from ``begin_step`` to ``end_step`` (the paper prunes fast at first, when
    redundant weights abound, and slowly near the end).

    Args:
      final_sparsity: ``s_f`` in ``[0, 1)``.
      begin_step, end_step: ``t0 < t1``.
      initial_sparsity: ``s_i`` in ``[0, s_f]`` (default 0).
      frequency: steps between pruning events (the paper's ``Δt``; default 100).

    Raises:
      ValueError: sparsities outside ``[0, 1)`` or decreasing, ``end_step <=
        begin_step``, or a non-positive frequency.

    Example:
      >>> s = CubicSparsitySchedule(0.9, begin_step=0, end_step=1000)
      >>> [round(float(s(t)), 4) for t in (0, 500, 1000)]
      [0.0, 0.7875, 0.9]
    """

    final_sparsity: float
    begin_step: int
    end_step: int
    initial_sparsity: float = 0.0
    frequency: int = 100

    def __post_init__(self):
        _check_fraction("final_sparsity", self.final_sparsity)
        _check_fraction("initial_sparsity", self.initial_sparsity)
        if self.initial_sparsity > self.final_sparsity:
            raise ValueError(
                f"initial_sparsity ({self.initial_sparsity}) must not exceed final_sparsity "
                f"({self.final_sparsity})"
            )
        _check_steps(self.begin_step, self.end_step, self.frequency)

    def __call__(self, step):
        """The target sparsity at ``step`` (a float32 array)."""
        t = jnp.clip(jnp.asarray(step, jnp.float32), self.begin_step, self.end_step)
        progress = (t - self.begin_step) / (self.end_step - self.begin_step)
        s_i, s_f = self.initial_sparsity, self.final_sparsity
        return s_f + (s_i - s_f) * (1.0 - progress) ** 3

    def is_update_step(self, step: int) -> bool:
        """Whether pruning happens at ``step`` (a Python int)."""
        step = int(step)
        if step < self.begin_step or step > self.end_step:
            return False
        return (step - self.begin_step) % self.frequency == 0 or step == self.end_step


@dataclasses.dataclass(frozen=True)
class CosineDropFraction:
    """RigL's drop fraction: ``f(t) = f0 / 2 * (1 + cos(pi * t / end_step))`` until
    ``end_step``, then 0 (Evci et al., 2020, "Rigging the Lottery").

    Args:
      initial: ``f0`` in ``[0, 1]`` (RigL: 0.3).
      end_step: the last step at which the pattern may change (RigL: 75% of training).
      delta_t: steps between pattern updates (RigL: 100).

    Raises:
      ValueError: ``initial`` outside ``[0, 1]``, ``end_step <= 0`` or ``delta_t <= 0``.

    Example:
      >>> f = CosineDropFraction(0.3, end_step=1000)
      >>> [round(float(f(t)), 4) for t in (0, 500, 1000)]
      [0.3, 0.15, 0.0]
    """

    initial: float
    end_step: int
    delta_t: int = 100

    def __post_init__(self):
        _check_fraction("drop fraction", self.initial, closed=True)
        _check_steps(0, self.end_step, self.delta_t)

    def __call__(self, step):
        """The fraction of stored blocks replaced at ``step`` (a float32 array)."""
        t = jnp.clip(jnp.asarray(step, jnp.float32), 0, self.end_step)
        return 0.5 * self.initial * (1.0 + jnp.cos(jnp.pi * t / self.end_step))

    def is_update_step(self, step: int) -> bool:
        """Whether the pattern changes at ``step``: every ``delta_t`` steps, from
        ``delta_t`` to before ``end_step``."""
        step = int(step)
        return 0 < step < self.end_step and step % self.delta_t == 0
