"""Calibration statistics of the ``nnx.Linear`` layers of any Flax NNX model: the
input Gram matrix ``XᵀX`` and the per-input-channel squared norms, averaged over
tokens, collected without changing the user's model code.

Each selected layer is replaced for the duration of the collection by a recording
layer that updates running averages (``nnx.Variable`` state, so it works under
``nnx.jit``) and then calls the original layer; the originals are put back
afterwards, also when ``forward`` raises. Memory per layer is ``in_features²``
floats (``in_features`` with ``gram=False``), never the activations.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from jsparse.nn import iter_linears, path_str, replace_module

__all__ = [
    "LayerStatistics",
    "calibration_batches",
    "calibration_order",
    "collect_statistics",
    "order_groups",
    "select_linears",
]

Path = tuple[Any, ...]


class LayerStatistics(NamedTuple):
    """The calibration statistics of one linear layer (inputs ``X``, all leading axes
    flattened into ``tokens`` rows).

    Attributes:
      gram: ``XᵀX / tokens``, ``(in, in)`` float32 (``None`` when not collected).
      sq_norms: ``Σ_tokens x_j² / tokens`` per input channel ``j``, ``(in,)`` float32
        (the diagonal of ``gram``; Wanda's ``‖x_j‖²`` up to the token count).
      tokens: number of rows of ``X`` seen.
      order: position of the layer's first call in ``forward`` (data-flow order).
      group: layers with the same ``group`` received the very same input array (e.g.
        the query, key and value projections), so they can be calibrated together.
      cross: with ``reference=``: ``X̂ᵀX / tokens``, the recorded inputs ``X̂`` against
        the inputs ``X`` the layer gets when the reference layers are dense.
      reference_gram: with ``reference=``: ``XᵀX / tokens``.

    Example:
      >>> import jax.numpy as jnp
      >>> from jsparse.prune import LayerStatistics
      >>> s = LayerStatistics(jnp.eye(2), jnp.ones(2), tokens=4, order=0, group=0)
      >>> s.tokens, s.sq_norms.tolist()
      (4, [1.0, 1.0])
    """

    gram: jax.Array | None
    sq_norms: jax.Array
    tokens: int
    order: int
    group: int
    cross: jax.Array | None = None
    reference_gram: jax.Array | None = None


def select_linears(model, filter: Any = None) -> list[tuple[Path, nnx.Linear]]:  # noqa: A002
    """The ``(path, layer)`` pairs of the :class:`flax.nnx.Linear` layers of ``model``
    that ``filter`` selects, in graph order.

    Args:
      model: an NNX module.
      filter: ``None`` (every ``nnx.Linear``); a string, a regular expression searched
        (``re.search``) in the layer's path string such as ``"layers/0"``; a callable
        ``(path, layer) -> bool``; or any NNX filter (a type ...).

    Returns:
      A list of ``(path, layer)``.

    Raises:
      ValueError: no ``nnx.Linear`` matches, or a matching one is stacked by
        ``nnx.vmap`` (a 3-D kernel; unstack it first).

    Example:
      >>> from flax import nnx
      >>> from jsparse.prune import select_linears
      >>> model = nnx.Sequential(nnx.Linear(4, 8, rngs=nnx.Rngs(0)), nnx.relu,
      ...                        nnx.Linear(8, 2, rngs=nnx.Rngs(1)))
      >>> [path for path, _ in select_linears(model, "layers/2")]
      [('layers', 2)]
    """
    if filter is None:
        predicate = ...
    elif isinstance(filter, str):
        pattern = re.compile(filter)

        def predicate(path, layer):
            return pattern.search(path_str(path)) is not None
    else:
        predicate = filter
    selected = iter_linears(model, predicate)
    if not selected:
        raise ValueError(
            f"no nnx.Linear layer of the model matches the filter {filter!r} (layers found: "
            f"{[path_str(p) for p, _ in iter_linears(model)]})"
        )
    for path, layer in selected:
        if layer.kernel[...].ndim != 2:
            raise ValueError(
                f"layer {path_str(path)!r} has a stacked kernel of shape "
                f"{tuple(layer.kernel[...].shape)} (nnx.vmap); calibration-based pruning "
                "needs one (in, out) kernel per layer"
            )
    return selected


class _Statistic(nnx.Variable):
    """A running calibration average held by a recording layer."""


@dataclasses.dataclass(eq=False)
class _Session:
    """Shared by the recording layers and stand-ins of one collection (hashable by
    identity: a static attribute). ``mode`` is ``"record"``, or ``"reference"`` while
    the reference forward runs (the pruned layers dense, the inputs kept for the
    cross terms of the recorded forward that follows)."""

    calls: list[tuple[str, int]] = dataclasses.field(default_factory=list)
    inputs: list[Any] = dataclasses.field(default_factory=list)
    mode: str = "record"
    references: dict[str, list[Any]] = dataclasses.field(default_factory=dict)
    counts: dict[str, int] = dataclasses.field(default_factory=dict)

    def record_call(self, path: str, x: Any) -> None:
        if all(p != path for p, _ in self.calls):
            self.calls.append((path, id(x)))
            self.inputs.append(x)

    def start(self, mode: str) -> None:
        self.mode = mode
        self.counts = {}
        if mode == "reference":
            self.references = {}


def _running(old, new_sum, keep, scale):
    return old * keep + new_sum * scale


class _Recorder(nnx.Module):
    """Updates the running statistics of its inputs, then calls the wrapped linear."""

    def __init__(self, linear: nnx.Linear, path: str, session: _Session, gram: bool, cross: bool):
        self.linear = linear
        self.path = path
        self.session = session
        k = int(linear.in_features)
        zeros = jnp.zeros((k, k), jnp.float32)
        self.gram = _Statistic(zeros) if gram else nnx.data(None)
        self.cross = _Statistic(zeros) if cross else nnx.data(None)
        self.reference_gram = _Statistic(zeros) if cross else nnx.data(None)
        self.sq_norms = _Statistic(jnp.zeros((k,), jnp.float32))
        self.tokens = _Statistic(jnp.zeros((), jnp.int32))
        self.reference_tokens = _Statistic(jnp.zeros((), jnp.int32))

    def __call__(self, inputs, *args, **kwargs):
        session = self.session
        x = jnp.asarray(inputs).reshape(-1, jnp.shape(inputs)[-1]).astype(jnp.float32)
        counter = self.reference_tokens if session.mode == "reference" else self.tokens
        old = counter[...]
        new = old + x.shape[0]
        counter[...] = new
        # Running means: each update weighs the old average by old/new tokens.
        keep = (old / jnp.maximum(new, 1)).astype(jnp.float32)
        scale = (1.0 / jnp.maximum(new, 1)).astype(jnp.float32)
        hi = jax.lax.Precision.HIGHEST
        if session.mode == "reference":
            session.references.setdefault(self.path, []).append(x)
            self.reference_gram[...] = _running(
                self.reference_gram[...], jnp.matmul(x.T, x, precision=hi), keep, scale
            )
            return self.linear(inputs, *args, **kwargs)
        session.record_call(self.path, inputs)
        if self.cross is not None:
            index = session.counts.get(self.path, 0)
            session.counts[self.path] = index + 1
            reference = session.references[self.path][index]
            self.cross[...] = _running(
                self.cross[...], jnp.matmul(x.T, reference, precision=hi), keep, scale
            )
        self.sq_norms[...] = _running(self.sq_norms[...], jnp.sum(x * x, axis=0), keep, scale)
        if self.gram is not None:
            self.gram[...] = _running(self.gram[...], jnp.matmul(x.T, x, precision=hi), keep, scale)
        return self.linear(inputs, *args, **kwargs)


class _StandIn(nnx.Module):
    """A pruned layer that runs its dense original during the reference forward."""

    def __init__(self, dense: nnx.Module, pruned: nnx.Module, session: _Session):
        self.dense = dense
        self.pruned = pruned
        self.session = session

    def __call__(self, *args, **kwargs):
        layer = self.dense if self.session.mode == "reference" else self.pruned
        return layer(*args, **kwargs)


def calibration_batches(calibration: Iterable[Any]) -> list[Any]:
    """The calibration batches as a list, checked: an iterable with at least one batch.

    Raises:
      ValueError: ``calibration`` is ``None`` or empty.
      TypeError: ``calibration`` is not iterable.

    Example:
      >>> from jsparse.prune.statistics import calibration_batches
      >>> len(calibration_batches(iter([1, 2])))
      2
      >>> calibration_batches([])
      Traceback (most recent call last):
      ...
      ValueError: the calibration iterable is empty: give at least one batch
    """
    if calibration is None:
        raise ValueError("calibration is None; pass an iterable of batches")
    try:
        batches = list(calibration)
    except TypeError as e:
        raise TypeError(
            f"calibration must be an iterable of batches, got {type(calibration).__name__}"
        ) from e
    if not batches:
        raise ValueError("the calibration iterable is empty: give at least one batch")
    return batches


def _run(model, forward, batches, selected, *, gram: bool, jit: bool, reference=None):
    """Install recorders on ``selected`` (and stand-ins for ``reference``), run
    ``forward`` over ``batches``, put the layers back; returns ``(recorders by path,
    session)``."""
    session = _Session()
    reference = dict(reference or {})
    cross = bool(reference)
    installed = []
    recorders = {}
    try:
        for path, layer in selected:
            recorder = _Recorder(layer, path_str(path), session, gram, cross)
            recorders[path_str(path)] = recorder
            replace_module(model, path, recorder)
            installed.append((path, layer))
        by_name = {path_str(p): (p, layer) for p, layer in iter_linears(model)}
        for name, dense in reference.items():
            if name not in by_name:
                raise ValueError(f"reference layer {name!r} is not an nnx.Linear of the model")
            path, current = by_name[name]
            replace_module(model, path, _StandIn(dense, current, session))
            installed.append((path, current))

        def step(model, batch):
            if cross:
                session.start("reference")
                forward(model, batch)
                session.start("record")
            forward(model, batch)
            session.references = {}

        step = nnx.jit(step) if jit else step
        for batch in batches:
            step(model, batch)
    finally:
        for path, layer in reversed(installed):
            replace_module(model, path, layer)
        session.start("record")
    return recorders, session


def _statistics(recorders, session: _Session) -> dict[str, LayerStatistics]:
    never = [name for name, r in recorders.items() if int(r.tokens[...]) == 0]
    if never:
        raise ValueError(
            f"forward never called the selected layer(s) {never} on the calibration data; "
            "exclude them with filter="
        )
    order = {path: i for i, (path, _) in enumerate(session.calls)}
    groups: dict[int, int] = {}
    group_of = {}
    for path, input_id in session.calls:
        group_of[path] = groups.setdefault(input_id, len(groups))
    session.inputs.clear()
    out = {}
    for name in sorted(recorders, key=order.__getitem__):
        r = recorders[name]
        arrays = {
            "gram": None if r.gram is None else r.gram[...],
            "sq_norms": r.sq_norms[...],
            "cross": None if r.cross is None else r.cross[...],
            "reference_gram": None if r.reference_gram is None else r.reference_gram[...],
        }
        if not all(bool(jnp.all(jnp.isfinite(a))) for a in arrays.values() if a is not None):
            raise ValueError(
                f"the calibration statistics of layer {name!r} are not finite (its inputs hold "
                "NaN or inf, or overflow float32)"
            )
        out[name] = LayerStatistics(
            tokens=int(r.tokens[...]), order=order[name], group=group_of[name], **arrays
        )
    return out


def collect_statistics(
    model,
    forward: Callable[[Any, Any], Any],
    calibration: Iterable[Any],
    *,
    filter: Any = None,  # noqa: A002
    gram: bool = True,
    jit: bool = True,
    reference: Mapping[str, nnx.Module] | None = None,
) -> dict[str, LayerStatistics]:
    """Calibration statistics of the selected ``nnx.Linear`` layers of ``model``.

    With ``reference={path: dense layer}`` for layers of ``model`` that have been
    pruned (still ``nnx.Linear``), every batch runs twice: once with those layers
    replaced by their dense originals (the *reference* inputs ``X`` of the selected
    layers, one batch of them held in memory) and once as the model is (the recorded
    inputs ``X̂``); the statistics then also hold ``cross = X̂ᵀX`` and
    ``reference_gram = XᵀX``. Sequential SparseGPT uses them to match the dense
    model's outputs rather than the pruned prefix's.

    Args:
      model: an NNX module; it is restored exactly as it was.
      forward: ``forward(model, batch)`` runs the model on one batch (its result is
        ignored).
      calibration: an iterable of batches.
      filter: which layers (:func:`select_linears`): ``None`` for every
        ``nnx.Linear``, a path regex, a callable ``(path, layer)`` or an NNX filter.
      gram: collect the ``(in, in)`` Gram matrices (``False``: only the squared
        norms, enough for Wanda and OWL).
      jit: run ``forward`` under :func:`flax.nnx.jit` (turn off for a forward that is
        not traceable).
      reference: ``{path string: dense nnx.Linear}`` (see above).

    Returns:
      ``{path string: LayerStatistics}`` in the order the layers are first called.

    Raises:
      ValueError: no matching layer, an empty ``calibration``, a selected layer that
        ``forward`` never calls, or non-finite statistics (each naming the layer).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from flax import nnx
      >>> from jsparse.prune import collect_statistics
      >>> model = nnx.Sequential(nnx.Linear(3, 4, rngs=nnx.Rngs(0)), nnx.relu,
      ...                        nnx.Linear(4, 2, rngs=nnx.Rngs(1)))
      >>> x = jax.random.normal(jax.random.key(0), (8, 3))
      >>> stats = collect_statistics(model, lambda m, b: m(b), [x[:5], x[5:]])
      >>> list(stats), stats["layers/0"].tokens
      (['layers/0', 'layers/2'], 8)
      >>> bool(jnp.allclose(stats["layers/0"].gram, x.T @ x / 8, atol=1e-5))
      True
    """
    batches = calibration_batches(calibration)
    selected = select_linears(model, filter)
    recorders, session = _run(
        model, forward, batches, selected, gram=gram, jit=jit, reference=reference
    )
    return _statistics(recorders, session)


def calibration_order(
    model,
    forward: Callable[[Any, Any], Any],
    batch: Any,
    *,
    filter: Any = None,  # noqa: A002
    jit: bool = False,
) -> list[list[str]]:
    """The selected layers in the order ``forward`` first calls them, grouped: the
    layers of one group receive the very same input array (query, key and value
    projections), so sequential pruning calibrates them in one pass.

    Args:
      model: an NNX module (restored afterwards).
      forward: ``forward(model, batch)``.
      batch: one batch.
      filter: which layers (:func:`select_linears`).
      jit: trace ``forward`` with :func:`flax.nnx.jit` instead of running it eagerly.

    Returns:
      A list of groups, each a list of path strings, in data-flow order.

    Raises:
      ValueError: as :func:`collect_statistics`.

    Example:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> from jsparse.prune import calibration_order
      >>> class Block(nnx.Module):
      ...     def __init__(self):
      ...         self.out = nnx.Linear(4, 4, rngs=nnx.Rngs(0))
      ...         self.q = nnx.Linear(4, 4, rngs=nnx.Rngs(1))
      ...         self.k = nnx.Linear(4, 4, rngs=nnx.Rngs(2))
      ...     def __call__(self, x):
      ...         return self.out(self.q(x) * self.k(x))
      >>> calibration_order(Block(), lambda m, b: m(b), jnp.ones((2, 4)))
      [['q', 'k'], ['out']]
    """
    stats = collect_statistics(model, forward, [batch], filter=filter, gram=False, jit=jit)
    return order_groups(stats)


def order_groups(stats: dict[str, LayerStatistics]) -> list[list[str]]:
    """Group the paths of ``stats`` by ``group``, groups and members in call order.

    Example:
      >>> import jax.numpy as jnp
      >>> from jsparse.prune import LayerStatistics, order_groups
      >>> s = lambda order, group: LayerStatistics(None, jnp.ones(1), 1, order, group)
      >>> order_groups({"v": s(2, 0), "q": s(0, 0), "o": s(3, 1)})
      [['q', 'v'], ['o']]
    """
    groups: dict[int, list[str]] = {}
    for name in sorted(stats, key=lambda p: stats[p].order):
        groups.setdefault(stats[name].group, []).append(name)
    return sorted(groups.values(), key=lambda g: stats[g[0]].order)
