"""SquareHead distillation (Kurtic et al. 2023): recover a pruned model's accuracy by
matching the dense teacher's hidden states, layer by layer, with a normalised MSE.

:func:`hidden_states` captures the outputs of chosen submodules of any NNX model
without changing its code: for the duration of one call, each chosen submodule is
wrapped by a capturing module that records its output and returns it unchanged; the
originals are put back before the call returns (also on error). Because the graph is
the same before and after, it works inside :func:`flax.nnx.jit`,
:func:`flax.nnx.grad` and :func:`flax.nnx.value_and_grad` on the models passed to
them; a model closed over from outside the transform (a frozen teacher) cannot be
changed there, so a copy of it is run (its state updates, such as RNG counters, are
not written back: pass it as an argument to keep them).

Fine-tuning a model pruned by :func:`~jsparse.prune.oneshot` keeps its pattern: the
sparse layers store only the kept values (``nnx.Param``) and their index arrays are
:class:`~jsparse.nn.SparsityPattern` variables, so ``nnx.Optimizer(student, tx,
wrt=nnx.Param)`` holds state for the stored values only and never touches the
pattern (for whole formats in plain optax, :func:`jsparse.train.values_only`).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from flax.errors import TraceContextError

from jsparse.nn import path_str, replace_module

__all__ = ["hidden_states", "select_modules", "squarehead_loss"]


def select_modules(model, filter: Any) -> list[tuple[tuple, nnx.Module]]:  # noqa: A002
    """The ``(path, module)`` pairs of the submodules of ``model`` (not ``model``
    itself) that ``filter`` selects, in graph order.

    Args:
      model: an NNX module.
      filter: a string (a regular expression searched in the path string such as
        ``"layers/0"``), a callable ``(path, module) -> bool``, or a type.

    Returns:
      A list of ``(path, module)``.

    Raises:
      ValueError: nothing matches.

    Example:
      >>> from flax import nnx
      >>> from jsparse.prune import select_modules
      >>> model = nnx.Sequential(nnx.Linear(2, 2, rngs=nnx.Rngs(0)), nnx.relu,
      ...                        nnx.Linear(2, 2, rngs=nnx.Rngs(1)))
      >>> [p for p, _ in select_modules(model, nnx.Linear)]
      [('layers', 0), ('layers', 2)]
    """
    if isinstance(filter, str):
        pattern = re.compile(filter)

        def predicate(path, module):
            return pattern.search(path_str(path)) is not None
    elif isinstance(filter, type):

        def predicate(path, module):
            return isinstance(module, filter)
    elif callable(filter):
        predicate = filter
    else:
        raise TypeError(f"filter must be a regex string, a callable or a type, got {filter!r}")
    out = [
        (tuple(path), node)
        for path, node in nnx.iter_graph(model)
        if path and isinstance(node, nnx.Module) and predicate(tuple(path), node)
    ]
    if not out:
        raise ValueError(f"no submodule of the model matches the filter {filter!r}")
    return out


@dataclasses.dataclass(eq=False)
class _Store:
    """Outputs captured during one call (hashable by identity: a static attribute)."""

    outputs: list[Any] = dataclasses.field(default_factory=list)


class _Capture(nnx.Module):
    def __init__(self, inner: nnx.Module, store: _Store):
        self.inner = inner
        self.store = store

    def __call__(self, *args, **kwargs):
        out = self.inner(*args, **kwargs)
        self.store.outputs.append(out)
        return out


def hidden_states(
    model,
    forward: Callable[[Any, Any], Any],
    batch: Any,
    filter: Any,  # noqa: A002
) -> tuple[Any, list[Any]]:
    """Run ``forward(model, batch)`` and return its output with the outputs of the
    submodules that ``filter`` selects, in the order they were called (a submodule
    called twice appears twice).

    Args:
      model: an NNX module (restored before returning).
      forward: ``forward(model, batch)``.
      batch: the input.
      filter: which submodules (:func:`select_modules`): a path regex such as
        ``r"layers/\\d+$"``, a callable ``(path, module)``, or a type.

    Returns:
      ``(output, hidden)``, ``hidden`` a list of the captured outputs.

    Raises:
      ValueError: nothing matches ``filter``.

    Example:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> from jsparse.prune import hidden_states
      >>> model = nnx.Sequential(nnx.Linear(3, 4, rngs=nnx.Rngs(0)), nnx.relu,
      ...                        nnx.Linear(4, 2, rngs=nnx.Rngs(1)))
      >>> out, hidden = hidden_states(model, lambda m, x: m(x), jnp.ones((5, 3)), nnx.Linear)
      >>> [h.shape for h in hidden], bool(jnp.all(hidden[-1] == out))
      ([(5, 4), (5, 2)], True)
    """
    select_modules(model, filter)  # a clear error before anything else
    try:
        return _run_captured(model, forward, batch, filter)
    except TraceContextError:
        # A model from outside the current transform (a teacher closed over by a
        # jitted step) cannot be changed here: run a copy of it instead.
        return _run_captured(nnx.merge(*nnx.split(model)), forward, batch, filter)


def _run_captured(model, forward, batch, filter):  # noqa: A002
    chosen = select_modules(model, filter)
    store = _Store()
    # Deepest first, so that wrapping a child never changes its parent's path.
    chosen.sort(key=lambda pm: -len(pm[0]))
    installed = []
    try:
        for path, module in chosen:
            replace_module(model, path, _Capture(module, store))
            installed.append((path, module))
        out = forward(model, batch)
    finally:
        for path, module in reversed(installed):
            replace_module(model, path, module)
    return out, list(store.outputs)


def _masked_sum(x: jax.Array, mask: jax.Array | None) -> jax.Array:
    if mask is None:
        return jnp.sum(x)
    w = jnp.asarray(mask, x.dtype)
    w = jnp.reshape(w, w.shape + (1,) * (x.ndim - w.ndim))
    return jnp.sum(x * w)


def _masked_mean(x: jax.Array, mask: jax.Array | None) -> jax.Array:
    if mask is None:
        return jnp.mean(x)
    w = jnp.asarray(mask, x.dtype)
    return jnp.sum(x * w) / jnp.maximum(jnp.sum(w), 1)


def squarehead_loss(
    student_hidden: Sequence[jax.typing.ArrayLike],
    teacher_hidden: Sequence[jax.typing.ArrayLike],
    *,
    mask: jax.typing.ArrayLike | None = None,
    student_logits: jax.typing.ArrayLike | None = None,
    teacher_logits: jax.typing.ArrayLike | None = None,
    labels: jax.typing.ArrayLike | None = None,
    hidden_weight: float = 1.0,
    ce_weight: float = 0.0,
    kl_weight: float = 0.0,
    temperature: float = 1.0,
    eps: float = 1e-12,
) -> jax.Array:
    """The SquareHead distillation loss, a pure function:

    ``hidden_weight · Σ_l mean((s_l − t_l)²) / mean(t_l²)
    + ce_weight · CE(student_logits, labels)
    + kl_weight · T² · KL(softmax(teacher_logits/T) ‖ softmax(student_logits/T))``.

    The teacher's terms get ``stop_gradient``. With ``mask`` (e.g. the attention
    mask, shape ``hidden.shape[:-1]``), the means run over the kept positions only.

    Args:
      student_hidden, teacher_hidden: equal-length sequences of arrays of equal
        shapes (e.g. from :func:`hidden_states`).
      mask: optional ``(...,)`` 0/1 weights of the positions (leading axes of the
        hidden states and of the logits).
      student_logits, teacher_logits: ``(..., classes)``, for the KL term (and the
        student's for the CE term).
      labels: ``(...,)`` integer labels, for the CE term.
      hidden_weight, ce_weight, kl_weight: the terms' weights (a zero weight drops a
        term).
      temperature: ``T`` of the KL term.
      eps: guards the normalisation of an all-zero teacher state.

    Returns:
      A float32 scalar.

    Raises:
      ValueError: the sequences differ in length or shapes, or a weighted term lacks
        its inputs.

    Example:
      >>> import jax.numpy as jnp
      >>> from jsparse.prune import squarehead_loss
      >>> t = [jnp.ones((2, 3)), 2 * jnp.ones((2, 3))]
      >>> float(squarehead_loss([h * 1.5 for h in t], t))  # 0.25 + 0.25
      0.5
    """
    student_hidden, teacher_hidden = list(student_hidden), list(teacher_hidden)
    if len(student_hidden) != len(teacher_hidden):
        raise ValueError(
            f"squarehead_loss: {len(student_hidden)} student hidden states vs "
            f"{len(teacher_hidden)} teacher ones"
        )
    total = jnp.zeros((), jnp.float32)
    if hidden_weight:
        for i, (s, t) in enumerate(zip(student_hidden, teacher_hidden, strict=True)):
            s = jnp.asarray(s, jnp.float32)
            t = jax.lax.stop_gradient(jnp.asarray(t, jnp.float32))
            if s.shape != t.shape:
                raise ValueError(
                    f"squarehead_loss: hidden state {i} has shape {s.shape} for the student "
                    f"and {t.shape} for the teacher"
                )
            num = _masked_sum((s - t) ** 2, mask)
            den = _masked_sum(t**2, mask)
            total = total + hidden_weight * num / jnp.maximum(den, eps)
    if ce_weight:
        if student_logits is None or labels is None:
            raise ValueError("squarehead_loss: ce_weight needs student_logits and labels")
        logp = jax.nn.log_softmax(jnp.asarray(student_logits, jnp.float32), axis=-1)
        labels = jnp.asarray(labels)
        nll = -jnp.take_along_axis(logp, labels[..., None].astype(jnp.int32), axis=-1)[..., 0]
        total = total + ce_weight * _masked_mean(nll, mask)
    if kl_weight:
        if student_logits is None or teacher_logits is None:
            raise ValueError("squarehead_loss: kl_weight needs student_logits and teacher_logits")
        temp = float(temperature)
        logp_s = jax.nn.log_softmax(jnp.asarray(student_logits, jnp.float32) / temp, axis=-1)
        logp_t = jax.lax.stop_gradient(
            jax.nn.log_softmax(jnp.asarray(teacher_logits, jnp.float32) / temp, axis=-1)
        )
        kl = jnp.sum(jnp.exp(logp_t) * (logp_t - logp_s), axis=-1)
        total = total + kl_weight * temp**2 * _masked_mean(kl, mask)
    return total
