"""``oneshot``: prune the linear layers of an NNX model once, with calibration data,
into jsparse layers."""

from __future__ import annotations

import dataclasses
import re
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from jsparse.core.checks import check_sparsity
from jsparse.nn import path_str, replace_module
from jsparse.prune.layers import to_sparse_layer
from jsparse.prune.methods import METHODS, prune_weight, reconstruction_error
from jsparse.prune.owl import OWL, owl_sparsities
from jsparse.prune.statistics import (
    calibration_batches,
    collect_statistics,
    order_groups,
    select_linears,
)
from jsparse.prune.structure import NMStructure, parse_structure

__all__ = ["LayerReport", "PruneReport", "oneshot"]


@dataclasses.dataclass(frozen=True)
class LayerReport:
    """What :func:`oneshot` did to one layer.

    Attributes:
      path: the layer's path string (``"layers/0"``).
      method, structure: how it was pruned (``structure`` as text).
      target_sparsity: the sparsity asked for (after OWL).
      sparsity: the fraction of the layer's weights removed.
      error: ``‖XW − XŴ‖/‖XW‖`` on the layer's calibration inputs (the outputs of the
        already-pruned earlier layers in sequential mode), bias excluded.
      seconds: time spent pruning the layer (statistics collection excluded).
      shape: the kernel's ``(in, out)``.

    Example:
      >>> from jsparse.prune import LayerReport
      >>> r = LayerReport("fc", "wanda", "2:4", 0.5, 0.5, 0.12, 0.01, (8, 4))
      >>> r.error
      0.12
    """

    path: str
    method: str
    structure: str
    target_sparsity: float
    sparsity: float
    error: float
    seconds: float
    shape: tuple[int, int]


class PruneReport(dict):
    """``{path: LayerReport}`` in pruning order, with a summary.

    Attributes:
      calibration_seconds: time spent running the calibration passes.

    Example:
      >>> from jsparse.prune import LayerReport, PruneReport
      >>> report = PruneReport({"fc": LayerReport("fc", "magnitude", "unstructured",
      ...                                         0.5, 0.5, 0.25, 0.0, (4, 4))})
      >>> report.mean_error, report.sparsity
      (0.25, 0.5)
    """

    calibration_seconds: float = 0.0

    @property
    def mean_error(self) -> float:
        """The mean relative reconstruction error over layers."""
        return float(np.mean([r.error for r in self.values()])) if self else 0.0

    @property
    def sparsity(self) -> float:
        """The fraction of all pruned layers' weights removed."""
        sizes = np.array([r.shape[0] * r.shape[1] for r in self.values()], float)
        if not sizes.size:
            return 0.0
        return float(np.sum(sizes * [r.sparsity for r in self.values()]) / sizes.sum())

    def markdown(self) -> str:
        """A markdown table, one row per layer.

        Example:
          >>> from jsparse.prune import LayerReport, PruneReport
          >>> r = LayerReport("fc", "wanda", "2:4", 0.5, 0.5, 0.125, 0.5, (8, 4))
          >>> print(PruneReport({"fc": r}).markdown().splitlines()[2])
          | fc | 8x4 | wanda | 2:4 | 0.500 | 0.1250 | 0.50 |
        """
        lines = [
            "| layer | in x out | method | structure | sparsity | rel. error | s |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in self.values():
            lines.append(
                f"| {r.path} | {r.shape[0]}x{r.shape[1]} | {r.method} | {r.structure} | "
                f"{r.sparsity:.3f} | {r.error:.4f} | {r.seconds:.2f} |"
            )
        return "\n".join(lines)


def _owl_config(owl) -> OWL | None:
    if owl is None or owl is False:
        return None
    if owl is True:
        return OWL()
    if isinstance(owl, OWL):
        return owl
    if isinstance(owl, Mapping):
        return OWL(**owl)
    raise TypeError(f"owl must be a bool, an OWL(m, lam) or a mapping, got {owl!r}")


def _sparsities(sparsity, names: list[str], structure) -> dict[str, float]:
    """The per-layer target sparsities, validated, naming the layer at fault."""
    if isinstance(structure, NMStructure):
        if isinstance(sparsity, Mapping):
            raise ValueError(
                f"structure {structure} fixes the sparsity at {1 - structure.density:g}; "
                "a per-layer sparsity mapping does not apply"
            )
        return dict.fromkeys(names, 1.0 - structure.density)
    if isinstance(sparsity, Mapping):
        missing = [k for k in names if k not in sparsity]
        extra = [k for k in sparsity if k not in names]
        if missing or extra:
            raise ValueError(
                f"the sparsity mapping must name exactly the selected layers {names}; "
                f"missing {missing}, unknown {extra}"
            )
        out = {}
        for k in names:
            try:
                out[k] = check_sparsity(sparsity[k])
            except (TypeError, ValueError) as e:
                raise type(e)(f"layer {k!r}: {e}") from None
        return out
    try:
        s = check_sparsity(sparsity)
    except (TypeError, ValueError) as e:
        raise type(e)(f"{e} (for the layers {names})") from None
    return dict.fromkeys(names, s)


def _block_groups(groups: list[list[str]], pattern: str) -> list[list[str]]:
    """Merge the call-order groups of layers whose paths start with the same match of
    ``pattern`` (one block); the blocks keep the order of their first layer."""
    try:
        regex = re.compile(pattern)
    except re.error as e:
        raise ValueError(f"sequential={pattern!r} is not a valid regular expression: {e}") from e
    merged: dict[Any, list[str]] = {}
    for group in groups:
        for name in group:
            match = regex.match(name)
            key = ("block", match.group(0)) if match else ("layer", tuple(group))
            merged.setdefault(key, []).append(name)
    return list(merged.values())


def oneshot(
    model,
    forward: Callable[[Any, Any], Any],
    calibration: Iterable[Any],
    *,
    method: str = "sparsegpt",
    sparsity: float | Mapping[str, float] = 0.5,
    structure: Any = "unstructured",
    filter: Any = None,  # noqa: A002
    sequential: bool | str = True,
    owl: bool | OWL | Mapping[str, float] = False,
    jit: bool = True,
    impl: str = "auto",
    **method_options: Any,
):
    """Prune the ``nnx.Linear`` layers of ``model`` once, with calibration data, into
    jsparse layers.

    Statistics (:func:`~jsparse.prune.collect_statistics`) come from running
    ``forward`` over ``calibration`` with recording layers in place. In sequential
    mode (the default, as in the SparseGPT and Wanda references) the layers are
    pruned in data-flow order, each calibrated on the outputs of the layers already
    pruned before it: one pass over the calibration data per group of layers that
    share their input (query, key and value together), plus a first pass that finds
    the order. ``sequential=False`` takes every layer's statistics from the dense
    model in one pass.

    Args:
      model: an NNX module, modified in place: each selected ``nnx.Linear`` becomes a
        :class:`~jsparse.nn.BCSRLinear` (unstructured: 1x1 blocks; or ``(bm, bn)``
        blocks) or :class:`~jsparse.nn.NMLinear` (N:M), keeping its bias, dtypes,
        precision and metadata. The original layer objects are not changed (keep a
        dense copy for distillation with ``nnx.clone(model)`` first).
      forward: ``forward(model, batch)`` runs the model on one batch.
      calibration: an iterable of batches (materialised once into a list; 128
        samples is the papers' default).
      method: ``"magnitude"``, ``"wanda"`` or ``"sparsegpt"``.
      sparsity: the fraction of weights (blocks) removed, in ``[0, 1)``, or a mapping
        from every selected layer's path string to its own; fixed by ``n:m`` for N:M.
      structure: ``"unstructured"``, a block shape ``(bm, bn)`` of the ``(in, out)``
        kernel, ``"n:m"`` (``"2:4"``; groups along the inputs), ``"n:mT"`` for
        optimal transposable N:M (``m <= 4``), or a :class:`~jsparse.prune.Blocks` /
        :class:`~jsparse.prune.NMStructure`.
      filter: which layers: ``None`` (every ``nnx.Linear``), a regex searched in the
        path string, a callable ``(path, layer)`` or an NNX filter.
      sequential: calibrate each layer on the already-pruned layers' outputs
        (``True``); ``False`` for the dense model's statistics; or a regular
        expression naming blocks (``r"encoder/layers/\\d+"``, matched at the start of
        the layer paths) to calibrate all layers of a block in one pass on the
        outputs of the already-pruned earlier blocks, as the SparseGPT and Wanda
        reference code does per transformer block (fewer passes; layers whose path
        does not match form groups of their own).
      owl: ``True`` (or :class:`~jsparse.prune.OWL`\\ ``(m, lam)``) for OWL's
        per-layer sparsities around ``sparsity`` (from the dense model's Wanda
        scores); not with N:M nor a sparsity mapping.
      jit: run ``forward`` under :func:`flax.nnx.jit` while collecting statistics.
      impl: the matmul implementation of the new layers.
      **method_options: SparseGPT's ``damping`` (fraction of the mean Hessian
        diagonal, 0.01), ``block_size`` (128) and ``match_dense`` (``False``; in
        sequential mode, ``True`` first refits each layer to the *dense* model's
        outputs given the pruned inputs it gets, :func:`~jsparse.prune.corrected_kernel`:
        a lower error on the calibration data, but a closer fit to it, which on a
        pretrained encoder lowered the quality on other text; docs/pruning.md).

    Returns:
      ``(model, report)``: the model (the same object) and a
      :class:`~jsparse.prune.PruneReport` with each layer's sparsity, relative
      reconstruction error on its calibration inputs, and time.

    Raises:
      ValueError: no matching layer; a sparsity outside ``[0, 1)``; ``n >= m``; a
        block shape or ``m`` that does not divide a layer; an empty calibration; a
        layer that ``forward`` never calls; a Hessian that is not positive definite
        (each naming the layer). On error the model is restored.
      TypeError: an unknown method option.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from flax import nnx
      >>> import jsparse
      >>> model = nnx.Sequential(nnx.Linear(16, 32, rngs=nnx.Rngs(0)), nnx.relu,
      ...                        nnx.Linear(32, 8, rngs=nnx.Rngs(1)))
      >>> data = [jax.random.normal(jax.random.key(i), (32, 16)) for i in range(4)]
      >>> model, report = jsparse.prune.oneshot(model, lambda m, x: m(x), data,
      ...                                       structure="2:4")
      >>> type(model.layers[0]).__name__, report["layers/2"].sparsity
      ('NMLinear', 0.5)
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    takes = {"damping", "block_size", "match_dense"} if method == "sparsegpt" else set()
    unknown = set(method_options) - takes
    if unknown:
        raise TypeError(f"method {method!r} does not take the option(s) {sorted(unknown)}")
    match_dense = bool(method_options.pop("match_dense", False))
    if not isinstance(sequential, bool | str):
        raise TypeError(f"sequential must be a bool or a block regex, got {sequential!r}")
    structure = parse_structure(structure)
    owl_config = _owl_config(owl)
    selected = select_linears(model, filter)
    names = [path_str(p) for p, _ in selected]
    by_name = {path_str(p): (p, layer) for p, layer in selected}
    for name, (_, layer) in by_name.items():
        structure.check(tuple(layer.kernel[...].shape), name)
    targets = _sparsities(sparsity, names, structure)
    by_layer = isinstance(sparsity, Mapping)
    if owl_config is not None and (isinstance(structure, NMStructure) or by_layer):
        raise ValueError("owl sets per-layer sparsities: not with N:M nor a sparsity mapping")
    batches = calibration_batches(calibration)

    def only(group):
        wanted = set(group)
        return lambda path, layer: path_str(path) in wanted

    report = PruneReport()
    calibration_seconds = 0.0
    done: list[tuple[tuple, nnx.Linear, Any, Any]] = []
    try:
        t0 = time.perf_counter()
        first = collect_statistics(
            model, forward, batches, filter=only(names), gram=not sequential, jit=jit
        )
        calibration_seconds += time.perf_counter() - t0
        if owl_config is not None:
            scores = {
                k: jnp.abs(by_name[k][1].kernel[...].astype(jnp.float32))
                * jnp.sqrt(first[k].sq_norms)[:, None]
                for k in first
            }
            targets = owl_sparsities(scores, float(sparsity), m=owl_config.m, lam=owl_config.lam)
        groups = order_groups(first) if sequential is not False else [list(first)]
        if isinstance(sequential, str):
            groups = _block_groups(groups, sequential)
        for group in groups:
            if sequential:
                t0 = time.perf_counter()
                # match_dense: cross terms against the inputs the group gets with the
                # pruned layers dense, so SparseGPT fits the dense model's outputs.
                reference = (
                    {path_str(p): linear for p, linear, _, _ in done} if match_dense else None
                )
                stats = collect_statistics(
                    model, forward, batches, filter=only(group), gram=True, jit=jit,
                    reference=reference,
                )  # fmt: skip
                calibration_seconds += time.perf_counter() - t0
            else:
                stats = first
            for name in group:
                path, linear = by_name[name]
                kernel = linear.kernel[...]
                t0 = time.perf_counter()
                pruned, mask = prune_weight(
                    kernel, stats[name], method=method, sparsity=targets[name],
                    structure=structure, name=name, **method_options,
                )  # fmt: skip
                pruned.block_until_ready()
                seconds = time.perf_counter() - t0
                report[name] = LayerReport(
                    path=name,
                    method=method,
                    structure=str(structure),
                    target_sparsity=float(targets[name]),
                    sparsity=1.0 - float(np.mean(np.asarray(mask))),
                    error=reconstruction_error(
                        kernel,
                        pruned,
                        stats[name].gram,
                        cross=stats[name].cross,
                        reference_gram=stats[name].reference_gram,
                    ),  # fmt: skip
                    seconds=seconds,
                    shape=tuple(int(d) for d in kernel.shape),
                )
                done.append((path, linear, pruned, mask))
                if sequential:
                    # Later layers calibrate on this layer's pruned output (dense math,
                    # so calibration passes stay fast whatever the target format).
                    stand_in = nnx.clone(linear)
                    stand_in.kernel[...] = pruned.astype(kernel.dtype)
                    replace_module(model, path, stand_in)
        for path, linear, pruned, mask in done:
            replace_module(model, path, to_sparse_layer(linear, pruned, mask, structure, impl=impl))
    except BaseException:
        for path, linear, _, _ in done:
            replace_module(model, path, linear)
        raise
    report.calibration_seconds = calibration_seconds
    return model, report
