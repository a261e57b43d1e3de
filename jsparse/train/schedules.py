"""Schedules of sparse training, as optax schedules: the cubic sparsity ramp of gradual
magnitude pruning (Zhu & Gupta, 2017) and the cosine-decayed drop fraction of RigL
(Evci et al., 2020).

Both constructors validate their arguments and return a plain optax schedule
(``step -> value``; ``step`` a Python int or a traced array). *When* the pattern
changes is up to the algorithm using the schedule
(:meth:`~jsparse.train.GradualMagnitudePruning.is_update_step`,
:meth:`~jsparse.train.RigL.is_update_step`). ``step`` counts optimizer steps already
taken (the value of ``nnx.Optimizer.step`` after the step).
"""

from __future__ import annotations

import optax

__all__ = ["cosine_drop_fraction", "cubic_sparsity"]


def _check_fraction(name: str, value: float, *, closed: bool = False) -> float:
    """``value`` as a float in ``[0, 1)`` (``[0, 1]`` if ``closed``), or a ``ValueError``.

    Args:
      name: how the error message calls the value.
      value: the number to check.
      closed: whether 1 is allowed.

    Returns:
      ``float(value)``.

    Example:
      >>> _check_fraction("drop fraction", 1, closed=True)
      1.0
    """
    value = float(value)
    ok = 0.0 <= value <= 1.0 if closed else 0.0 <= value < 1.0
    if not ok:
        interval = "[0, 1]" if closed else "[0, 1)"
        raise ValueError(f"{name} must be in {interval}, got {value}")
    return value


def check_steps(begin_step: int, end_step: int, frequency: int | None = None) -> None:
    """Check ``0 <= begin_step < end_step`` and ``frequency > 0`` (unless ``None``).

    Args:
      begin_step, end_step: the steps where a schedule starts and ends.
      frequency: steps between pattern updates, or ``None`` (not checked).

    Returns:
      ``None``; raises ``ValueError`` naming the offending value.

    Example:
      >>> check_steps(0, 100, 10)
    """
    if int(begin_step) < 0:
        raise ValueError(f"begin_step must be >= 0, got {begin_step}")
    if int(end_step) <= int(begin_step):
        raise ValueError(f"end_step ({end_step}) must come after begin_step ({begin_step})")
    if frequency is not None and int(frequency) <= 0:
        raise ValueError(f"frequency must be a positive number of steps, got {frequency}")


def cubic_sparsity(
    final_sparsity: float,
    *,
    begin_step: int,
    end_step: int,
    initial_sparsity: float = 0.0,
) -> optax.Schedule:
    """The gradual pruning schedule of Zhu & Gupta (2017), "To prune, or not to prune".

    ``s(t) = s_f + (s_i - s_f) * (1 - (t - t0) / (t1 - t0)) ** 3`` for ``t0 <= t <= t1``;
    ``s_i`` before ``t0`` and ``s_f`` after ``t1``: ``optax.polynomial_schedule`` with
    power 3 (the paper's ``n * Δt`` is ``t1 - t0``). It prunes fast at first, when
    redundant weights abound, and slowly near the end.

    Args:
      final_sparsity: ``s_f`` in ``[0, 1)``.
      begin_step, end_step: ``t0 < t1``.
      initial_sparsity: ``s_i`` in ``[0, s_f]`` (default 0).

    Returns:
      An optax schedule: step -> target sparsity (a float32 array).

    Raises:
      ValueError: sparsities outside ``[0, 1)`` or decreasing, or ``end_step <=
        begin_step``.

    Example:
      >>> s = cubic_sparsity(0.9, begin_step=0, end_step=1000)
      >>> [round(float(s(t)), 4) for t in (0, 500, 1000)]
      [0.0, 0.7875, 0.9]
    """
    final_sparsity = _check_fraction("final_sparsity", final_sparsity)
    initial_sparsity = _check_fraction("initial_sparsity", initial_sparsity)
    if initial_sparsity > final_sparsity:
        raise ValueError(
            f"initial_sparsity ({initial_sparsity}) must not exceed final_sparsity "
            f"({final_sparsity})"
        )
    check_steps(begin_step, end_step)
    return optax.polynomial_schedule(
        init_value=initial_sparsity,
        end_value=final_sparsity,
        power=3,
        transition_steps=int(end_step) - int(begin_step),
        transition_begin=int(begin_step),
    )


def cosine_drop_fraction(initial: float, *, end_step: int) -> optax.Schedule:
    """RigL's drop fraction: ``f(t) = f0 / 2 * (1 + cos(pi * t / end_step))`` until
    ``end_step``, then 0 (Evci et al., 2020, "Rigging the Lottery"):
    ``optax.cosine_decay_schedule(f0, end_step)``.

    Args:
      initial: ``f0`` in ``[0, 1]`` (RigL: 0.3).
      end_step: the last step at which the pattern may change (RigL: 75% of training).

    Returns:
      An optax schedule: step -> fraction of stored blocks replaced (a float32 array).

    Raises:
      ValueError: ``initial`` outside ``[0, 1]`` or ``end_step <= 0``.

    Example:
      >>> f = cosine_drop_fraction(0.3, end_step=1000)
      >>> [round(float(f(t)), 4) for t in (0, 500, 1000)]
      [0.3, 0.15, 0.0]
    """
    initial = _check_fraction("drop fraction", initial, closed=True)
    check_steps(0, end_step)
    return optax.cosine_decay_schedule(init_value=initial, decay_steps=int(end_step))
