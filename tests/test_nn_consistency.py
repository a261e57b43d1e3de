"""Every jsparse layer against ``flax.nnx.Linear`` holding the same dense kernel.

Each case builds a kernel that its format stores exactly (any kernel for BCSR at
sparsity 0 and for LowRankSparse at sparsity 0; an N:M kernel for N:M; a kernel whose
sub-blocks have rank <= block_rank for Monarch), gives the same initializers and
arguments to the jsparse layer and to ``nnx.Linear``, and compares weights, outputs
(eager and under ``jit``), output dtypes and input gradients, for the dtype /
param_dtype combinations of ``nnx.Linear``. The oracle is always ``nnx.Linear``
(or NumPy), never the code under test. Then: ``nnx.with_partitioning`` metadata,
the sparsify -> densify round trip, ``set_kernel``, the layer registry and the
surgery helpers.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from flax.nnx.nn import dtypes
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

import jsparse
from jsparse.nn import (
    FORMATS,
    BCSRLinear,
    FormatLinear,
    LowRankSparseLinear,
    MonarchLinear,
    NMLinear,
    SparseLinear,
    SparsityPattern,
    SRSTELinear,
    densify,
    iter_linears,
    path_str,
    replace_module,
    sparse_layers,
    sparsify,
)

from oracle import assert_close, np_init

IN, OUT = 32, 16
NMLINEAR_N, NMLINEAR_M = 2, 4
MONARCH_BLOCKS, MONARCH_RANK = 4, 2


# ------------------------------------------------------------------ kernels (NumPy)
def any_kernel(seed=0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((IN, OUT)) / np.sqrt(IN)


def nm_kernel(seed=0) -> np.ndarray:
    """``n`` nonzeros (|w| >= 0.25) in every group of ``m`` along the input axis."""
    rng = np.random.default_rng(seed)
    kernel = np.zeros((IN // NMLINEAR_M, NMLINEAR_M, OUT))
    for g in range(IN // NMLINEAR_M):
        for j in range(OUT):
            keep = rng.choice(NMLINEAR_M, NMLINEAR_N, replace=False)
            kernel[g, keep, j] = rng.choice([-1, 1], NMLINEAR_N) * rng.uniform(0.25, 1, NMLINEAR_N)
    return kernel.reshape(IN, OUT)


def monarch_kernel(seed=0) -> np.ndarray:
    """Every ``(IN / b) x (OUT / b)`` sub-block of rank ``block_rank``."""
    rng = np.random.default_rng(seed)
    b, g = MONARCH_BLOCKS, MONARCH_RANK
    s, p = IN // b, OUT // b
    kernel = np.zeros((IN, OUT))
    for i in range(b):
        for j in range(b):
            sub = rng.standard_normal((s, g)) @ rng.standard_normal((g, p)) / np.sqrt(IN * g)
            kernel[i * s : (i + 1) * s, j * p : (j + 1) * p] = sub
    return kernel


def fixed_init(kernel: np.ndarray):
    """``kernel`` for the dense kernel's shape; other shapes (LowRank's ``U``) drawn."""

    def init(key, shape, dtype=jnp.float32):
        if tuple(shape) == kernel.shape:
            return jnp.asarray(kernel, dtype)
        return jax.random.normal(key, shape, dtype) * 0.1

    return init


def bias_init(key, shape, dtype=jnp.float32):
    return jnp.asarray(np.random.default_rng(7).standard_normal(shape), dtype)


def _x(shape, dtype=jnp.float32, seed=1):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), dtype)


# ------------------------------------------------------------------ cases
@dataclasses.dataclass(frozen=True)
class Case:
    """One layer type; ``params`` make it store ``make_kernel()`` exactly.

    ``exact``: the stored kernel is a bit-exact copy (otherwise a projection, exact
    up to rounding in ``param_dtype``). ``linear_params``: the ``from_linear`` /
    ``sparsify`` parameters that keep the kernel.
    """

    name: str
    layer_type: type
    params: dict
    make_kernel: Callable[[], np.ndarray]
    exact: bool
    linear_params: dict

    def __repr__(self):
        return self.name


CASES = [
    Case(
        "bcsr",
        BCSRLinear,
        dict(sparsity=0.0, block_shape=(8, 4)),
        any_kernel,
        True,
        dict(sparsity=0.0, block_shape=(8, 4)),
    ),
    Case(
        "nm",
        NMLinear,
        dict(n=NMLINEAR_N, m=NMLINEAR_M),
        nm_kernel,
        True,
        dict(n=NMLINEAR_N, m=NMLINEAR_M),
    ),
    Case(
        "monarch",
        MonarchLinear,
        dict(nblocks=MONARCH_BLOCKS, block_rank=MONARCH_RANK),
        monarch_kernel,
        False,
        dict(nblocks=MONARCH_BLOCKS, block_rank=MONARCH_RANK),
    ),
    Case(
        "lowrank",
        LowRankSparseLinear,
        dict(rank=4, sparsity=0.0, block_shape=(4, 4)),
        any_kernel,
        True,
        # Full rank: U @ V is the kernel (up to the SVD's rounding).
        dict(rank=min(IN, OUT), sparsity=0.5, block_shape=(4, 4)),
    ),
]

# (name, nnx.Linear dtype arguments, input dtype)
DTYPES = [
    ("f32", dict(dtype=None, param_dtype=jnp.float32), jnp.float32),
    ("bf16", dict(dtype=None, param_dtype=jnp.bfloat16), jnp.bfloat16),
    ("bf16_compute_f32_params", dict(dtype=jnp.bfloat16, param_dtype=jnp.float32), jnp.float32),
    ("f32_compute_bf16_params", dict(dtype=jnp.float32, param_dtype=jnp.bfloat16), jnp.bfloat16),
]


def tolerance_dtype(case: Case, compute_dtype, param_dtype):
    """The compute dtype, or ``param_dtype`` when a projected kernel is rounded more
    coarsely than the computation."""
    if case.exact or jnp.finfo(param_dtype).bits >= jnp.finfo(compute_dtype).bits:
        return compute_dtype
    return param_dtype


def assert_same_kernel(case: Case, layer: FormatLinear, linear: nnx.Linear):
    expected = linear.kernel[...]
    assert layer.dense_kernel().dtype == expected.dtype
    if case.exact:
        np.testing.assert_array_equal(
            np.asarray(layer.dense_kernel(), np.float32), np.asarray(expected, np.float32)
        )
    else:
        assert_close(layer.dense_kernel(), expected, expected.dtype, k=4 * MONARCH_RANK)


def call(layer, x):
    return layer(x)


jit_call = nnx.jit(call)


# ------------------------------------------------------------------ consistency
# Every dtype combination with a bias; without one, in float32 (the bias is added
# after the product, in the same code for every dtype).
LAYER_DTYPES = [(*d, True) for d in DTYPES] + [(*DTYPES[0], False)]


@pytest.mark.parametrize(
    "dtype_name, dtype_args, x_dtype, use_bias",
    LAYER_DTYPES,
    ids=[f"{d[0]}-{'bias' if d[3] else 'no_bias'}" for d in LAYER_DTYPES],
)
@pytest.mark.parametrize("case", CASES, ids=repr)
def test_layer_matches_nnx_linear(case, dtype_name, dtype_args, x_dtype, use_bias):
    kernel = case.make_kernel()
    common = dict(use_bias=use_bias, kernel_init=fixed_init(kernel), bias_init=bias_init)
    linear = nnx.Linear(IN, OUT, **common, **dtype_args, rngs=nnx.Rngs(0))
    layer = case.layer_type(IN, OUT, **common, **dtype_args, rngs=nnx.Rngs(0), **case.params)

    assert_same_kernel(case, layer, linear)
    if use_bias:
        np.testing.assert_array_equal(layer.bias[...], linear.bias[...])
        assert layer.bias[...].dtype == linear.bias[...].dtype
    else:
        assert layer.bias is None and linear.bias is None

    x = _x((3, 5, IN), x_dtype)  # leading batch axes
    compute = dtype_args["dtype"] or jnp.result_type(x_dtype, dtype_args["param_dtype"])
    tol = tolerance_dtype(case, compute, dtype_args["param_dtype"])
    for fwd in (call, jit_call):
        y, y_ref = fwd(layer, x), fwd(linear, x)
        assert y.dtype == y_ref.dtype == compute and y.shape == y_ref.shape == (3, 5, OUT)
        assert_close(y, y_ref, tol, k=IN, err_msg=f"{case} {dtype_name}")

    @jax.jit
    def input_grads(x):
        def loss(layer, x):
            return jnp.sum(jnp.sin(layer(x).astype(jnp.float32)))

        return jax.grad(lambda x: loss(layer, x))(x), jax.grad(lambda x: loss(linear, x))(x)

    gx, gx_ref = input_grads(x)
    assert gx.dtype == gx_ref.dtype == x_dtype
    assert_close(gx, gx_ref, tol, k=OUT)


@pytest.mark.parametrize("case", [c for c in CASES if c.name in ("bcsr", "lowrank")], ids=repr)
def test_default_initializers_draw_nnx_linears_kernel_and_bias(case):
    """At full density the default kernel_init gives nnx.Linear's kernel (same key)."""
    linear = nnx.Linear(IN, OUT, bias_init=nnx.initializers.normal(1.0), rngs=nnx.Rngs(3))
    layer = case.layer_type(
        IN, OUT, bias_init=nnx.initializers.normal(1.0), rngs=nnx.Rngs(3), **case.params
    )
    np.testing.assert_array_equal(layer.dense_kernel(), linear.kernel[...])
    np.testing.assert_array_equal(layer.bias[...], linear.bias[...])


@pytest.mark.parametrize("case", CASES, ids=repr)
def test_preferred_element_type_and_promote_dtype(case):
    kernel = case.make_kernel()
    calls = []

    def promote_f16(args, dtype=None):
        calls.append(len(args))
        return dtypes.promote_dtype(args, dtype=jnp.float16)

    x = _x((4, IN))
    for kwargs, out_dtype, tol in [
        (dict(dtype=jnp.bfloat16, preferred_element_type=jnp.float32), jnp.float32, jnp.bfloat16),
        (dict(promote_dtype=promote_f16), jnp.float16, jnp.float16),
    ]:
        common = dict(kernel_init=fixed_init(kernel), bias_init=bias_init, **kwargs)
        linear = nnx.Linear(IN, OUT, **common, rngs=nnx.Rngs(0))
        layer = case.layer_type(IN, OUT, **common, rngs=nnx.Rngs(0), **case.params)
        assert layer.preferred_element_type == linear.preferred_element_type
        y, y_ref = jit_call(layer, x), jit_call(linear, x)
        assert y.dtype == y_ref.dtype == out_dtype
        assert_close(y, y_ref, tol, k=IN)
    assert calls and all(n == 3 for n in calls)  # (inputs, kernel, bias), as nnx.Linear


@pytest.mark.parametrize("case", CASES, ids=repr)
def test_from_linear_keeps_function_and_attributes(case):
    kernel = case.make_kernel()
    linear = nnx.Linear(
        IN,
        OUT,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        precision=jax.lax.Precision.HIGHEST,
        preferred_element_type=jnp.float32,
        kernel_init=fixed_init(kernel),
        bias_init=bias_init,
        rngs=nnx.Rngs(0),
    )
    layer = case.layer_type.from_linear(linear, **case.linear_params)
    for attr in ("dtype", "param_dtype", "precision", "preferred_element_type", "promote_dtype"):
        assert getattr(layer, attr) == getattr(linear, attr), attr
    x = _x((4, IN))
    assert_close(jit_call(layer, x), jit_call(linear, x), jnp.float32, k=IN)
    back = layer.to_linear()
    for attr in ("dtype", "param_dtype", "precision", "preferred_element_type", "promote_dtype"):
        assert getattr(back, attr) == getattr(linear, attr), attr
    assert_close(back.kernel[...], linear.kernel[...], jnp.float32, k=IN)
    np.testing.assert_array_equal(back.bias[...], linear.bias[...])


def test_from_linear_warns_about_a_custom_dot_general():
    linear = nnx.Linear(IN, OUT, dot_general=jax.lax.dot_general, rngs=nnx.Rngs(0))
    linear.dot_general = lambda *args, **kwargs: jax.lax.dot_general(*args, **kwargs)
    with pytest.warns(UserWarning, match="dot_general"):
        BCSRLinear.from_linear(linear, sparsity=0.0, block_shape=(8, 8))


# ------------------------------------------------------------------ sharding metadata
@pytest.fixture
def mesh():
    # Auto axes: the annotations are hints; one CPU device carries every axis.
    mesh = jax.make_mesh((1, 1), ("data", "model"), axis_types=(AxisType.Auto, AxisType.Auto))
    with jax.set_mesh(mesh):
        yield mesh


# The spec each variable gets from the dense kernel's ("data", "model").
EXPECTED_SPECS = {
    "bcsr": {
        "kernel_data": P(None, "data", "model"),
        **{
            f"kernel_{f}": P(None) for f in ("indices", "indptr", "row_ids", "col_ptr", "col_order")
        },
    },
    "nm": {"kernel_values": P("data", "model"), "kernel_positions": P("data", "model")},
    "monarch": {"kernel_left": P(None, "data", None), "kernel_right": P(None, None, "model")},
    "lowrank": {
        "kernel_U": P("data", None),
        "kernel_V": P(None, "model"),
        "kernel_S_data": P(None, "data", "model"),
        **{
            f"kernel_S_{f}": P(None)
            for f in ("indices", "indptr", "row_ids", "col_ptr", "col_order")
        },
    },
}


def partition_specs(module) -> dict[str, P]:
    specs = nnx.get_partition_spec(nnx.state(module))
    return {path_str(path): v.get_value() for path, v in nnx.to_flat_state(specs)}


@pytest.mark.parametrize("case", CASES, ids=repr)
def test_with_partitioning_puts_the_spec_on_the_values(case, mesh):
    kernel = case.make_kernel()
    common = dict(
        kernel_init=nnx.with_partitioning(fixed_init(kernel), ("data", "model")),
        bias_init=nnx.with_partitioning(bias_init, ("model",)),
    )
    linear = nnx.Linear(IN, OUT, **common, rngs=nnx.Rngs(0))
    layer = case.layer_type(IN, OUT, **common, rngs=nnx.Rngs(0), **case.params)
    assert partition_specs(layer) == {**EXPECTED_SPECS[case.name], "bias": P("model")}
    assert partition_specs(linear)["bias"] == P("model")
    for name, variable in nnx.to_flat_state(nnx.state(layer, nnx.Param)):
        assert variable[...].sharding.mesh.axis_names == ("data", "model"), name
    x = _x((4, IN))
    assert_close(jit_call(layer, x), jit_call(linear, x), jnp.float32, k=IN)


@pytest.mark.parametrize("case", CASES, ids=repr)
def test_kernel_metadata_reaches_every_kernel_variable(case, mesh):
    layer = case.layer_type(
        IN,
        OUT,
        kernel_metadata={"out_sharding": ("data", "model"), "tag": "k"},
        bias_metadata={"out_sharding": ("model",), "tag": "b"},
        rngs=nnx.Rngs(0),
        **case.params,
    )
    assert partition_specs(layer) == {**EXPECTED_SPECS[case.name], "bias": P("model")}
    for name, variable in layer.kernel_variables.items():
        assert variable.get_metadata()["tag"] == "k", name
    assert layer.bias.get_metadata()["tag"] == "b"
    assert isinstance(layer.kernel_variables[next(iter(EXPECTED_SPECS[case.name]))], nnx.Param)


@pytest.mark.parametrize("case", CASES, ids=repr)
def test_sparsify_then_densify_keeps_precision_dtypes_and_partitioning(case, mesh):
    kernel = case.make_kernel()
    linear = nnx.Linear(
        IN,
        OUT,
        dtype=jnp.bfloat16,
        param_dtype=jnp.float32,
        precision="highest",
        preferred_element_type=jnp.float32,
        kernel_init=nnx.with_partitioning(fixed_init(kernel), ("data", "model")),
        bias_init=nnx.with_partitioning(bias_init, ("model",)),
        rngs=nnx.Rngs(0),
    )
    model = nnx.Sequential(linear, nnx.relu)
    x = _x((4, IN))
    y_ref = jit_call(model, x)

    model = sparsify(model, format=case.name, **case.linear_params)
    layer = model.layers[0]
    assert type(layer) is case.layer_type
    assert (layer.precision, layer.dtype, layer.param_dtype, layer.preferred_element_type) == (
        "highest",
        jnp.bfloat16,
        jnp.float32,
        jnp.float32,
    )
    specs = partition_specs(layer)
    for name, spec in EXPECTED_SPECS[case.name].items():
        if isinstance(getattr(layer, name), nnx.Param):
            assert specs[name] == spec, name
    assert specs["bias"] == P("model")
    assert_close(jit_call(model, x), y_ref, jnp.bfloat16, k=IN)

    model = densify(model)
    back = model.layers[0]
    assert type(back) is nnx.Linear
    for attr in ("precision", "dtype", "param_dtype", "preferred_element_type"):
        assert getattr(back, attr) == getattr(linear, attr), attr
    assert (
        partition_specs(back)
        == partition_specs(linear)
        == {
            "kernel": P("data", "model"),
            "bias": P("model"),
        }
    )
    assert back.kernel.get_metadata()["out_sharding"] == ("data", "model")
    assert_close(back.kernel[...], linear.kernel[...], jnp.float32, k=IN)
    assert_close(jit_call(model, x), y_ref, jnp.bfloat16, k=IN)


# ------------------------------------------------------------------ set_kernel
def _random_bcsr_numpy(rng, nse, grid, block_shape):
    flat = np.sort(rng.choice(grid[0] * grid[1], nse, replace=False))
    rows, cols = flat // grid[1], flat % grid[1]
    blocks = rng.standard_normal((nse, *block_shape)).astype(np.float32)
    dense = np.zeros((IN, OUT), np.float32)
    bm, bn = block_shape
    for (r, c), block in zip(zip(rows, cols, strict=True), blocks, strict=True):
        dense[r * bm : (r + 1) * bm, c * bn : (c + 1) * bn] = block
    return blocks, rows, cols, dense


def test_set_kernel_installs_a_new_pattern_without_recompiling():
    block_shape = (8, 4)
    layer = BCSRLinear(
        IN,
        OUT,
        sparsity=0.5,
        block_shape=block_shape,
        kernel_init=np_init,
        bias_init=bias_init,
        kernel_metadata={"tag": "k"},
        rngs=nnx.Rngs(0),
    )
    rng = np.random.default_rng(0)
    traces = []

    @nnx.jit
    def install(layer, w):
        traces.append(None)
        layer.set_kernel(w)

    x = _x((4, IN))
    for _ in range(2):
        blocks, rows, cols, dense = _random_bcsr_numpy(rng, layer.nse, (4, 4), block_shape)
        w = jsparse.BCSR.from_positions(blocks, rows, cols, shape=(IN, OUT))
        install(layer, w)
        np.testing.assert_array_equal(layer.dense_kernel(), dense)
        linear = nnx.Linear(
            IN, OUT, kernel_init=lambda *_, d=dense: d, bias_init=bias_init, rngs=nnx.Rngs(0)
        )
        assert_close(layer(x), linear(x), jnp.float32, k=IN)
    assert len(traces) == 1
    assert all(v.get_metadata()["tag"] == "k" for v in layer.kernel_variables.values())
    assert isinstance(layer.kernel_indices, SparsityPattern)


def test_set_kernel_rejects_another_structure():
    layer = BCSRLinear(IN, OUT, sparsity=0.5, block_shape=(8, 4), rngs=nnx.Rngs(0))
    before = np.asarray(layer.dense_kernel())
    with pytest.raises(TypeError, match="is a BCSR, got a NM"):
        layer.set_kernel(jsparse.NM.fromdense(jnp.asarray(nm_kernel()), n=2, m=4, axis=0))
    with pytest.raises(ValueError, match="kernel shape"):
        layer.set_kernel(jsparse.BCSR.fromdense(jnp.ones((OUT, IN)), block_shape=(8, 4), nse=8))
    with pytest.raises(ValueError, match="kernel_data has shape"):
        layer.set_kernel(jsparse.BCSR.fromdense(jnp.ones((IN, OUT)), block_shape=(8, 4), nse=7))
    with pytest.raises(ValueError, match="kernel_data has shape"):
        layer.set_kernel(jsparse.BCSR.fromdense(jnp.ones((IN, OUT)), block_shape=(4, 4), nse=8))
    nm = NMLinear(IN, OUT, n=2, m=4, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="static configuration"):
        nm.set_kernel(jsparse.NM.fromdense(jnp.asarray(nm_kernel()), n=1, m=2, axis=0))
    np.testing.assert_array_equal(layer.dense_kernel(), before)


# ------------------------------------------------------------------ registry, helpers
def test_layers_register_under_their_format_name():
    assert SparseLinear is BCSRLinear
    expected = {
        "bcsr": BCSRLinear,
        "nm": NMLinear,
        "monarch": MonarchLinear,
        "lowrank": LowRankSparseLinear,
    }
    assert {k: FORMATS[k] for k in expected} == expected
    assert all(cls.format_name == name for name, cls in expected.items())


def test_a_new_layer_class_is_found_by_sparsify():
    from jsparse.nn import format_linear

    class CopyLinear(BCSRLinear):
        format_name = "test_copy_of_bcsr"

    try:
        assert FORMATS["test_copy_of_bcsr"] is CopyLinear
        model = nnx.Sequential(nnx.Linear(IN, OUT, rngs=nnx.Rngs(0)))
        model = sparsify(model, format="test_copy_of_bcsr", sparsity=0.0, block_shape=(8, 8))
        assert type(model.layers[0]) is CopyLinear
        with pytest.raises(ValueError, match="already taken"):

            class Clash(NMLinear):
                format_name = "test_copy_of_bcsr"

    finally:
        format_linear._LAYERS.pop("test_copy_of_bcsr", None)
    assert "test_copy_of_bcsr" not in FORMATS


class MLP(nnx.Module):
    def __init__(self, rngs):
        self.layers = nnx.List([nnx.Linear(16, 32, rngs=rngs), nnx.Linear(32, 32, rngs=rngs)])
        self.norm = nnx.LayerNorm(32, rngs=rngs)
        self.head = nnx.Linear(32, 8, use_bias=False, rngs=rngs)


def test_iter_linears_replace_module_and_sparse_layers():
    model = MLP(nnx.Rngs(0))
    paths = [path for path, _ in iter_linears(model)]
    assert sorted(paths) == [("head",), ("layers", 0), ("layers", 1)]
    only_layers = iter_linears(model, filter=lambda path, layer: path[0] == "layers")
    assert [path_str(p) for p, _ in only_layers] == ["layers/0", "layers/1"]
    assert all(layer is model.layers[i] for (_, i), layer in only_layers)

    new = NMLinear(32, 32, rngs=nnx.Rngs(1))
    assert replace_module(model, ("layers", 1), new) is model
    assert model.layers[1] is new
    head = MonarchLinear(32, 8, nblocks=4, rngs=nnx.Rngs(2))
    replace_module(model, ("head",), head)
    assert model.head is head
    assert sparse_layers(model) == [(("head",), head), (("layers", 1), new)]
    assert [p for p, _ in iter_linears(model)] == [("layers", 0)]
    assert replace_module(model, (), new) is new


# ------------------------------------------------------------------ SRSTELinear
def dot_precisions(layer, x) -> set:
    """The ``precision`` of every ``dot_general`` in ``layer(x)``'s jaxpr (CPU runs
    every precision alike, so the jaxpr is where it shows)."""
    jaxpr = jax.make_jaxpr(lambda x: layer(x))(x)
    return {e.params["precision"] for e in jaxpr.eqns if e.primitive.name == "dot_general"}


@pytest.mark.parametrize("dtype_name, dtype_args, x_dtype", DTYPES, ids=[d[0] for d in DTYPES])
def test_srste_linear_on_an_nm_kernel_is_nnx_linear(dtype_name, dtype_args, x_dtype):
    linear = nnx.Linear(
        IN,
        OUT,
        kernel_init=fixed_init(nm_kernel()),
        bias_init=bias_init,
        precision="highest",
        **dtype_args,
        rngs=nnx.Rngs(0),
    )
    # The dense product is nnx.Linear's, bit for bit and at its precision; the N:M
    # products ("auto" on CPU) agree to rounding and give the same dtype.
    layer = SRSTELinear(linear, n=NMLINEAR_N, m=NMLINEAR_M, impl="dense")
    x = _x((3, IN), x_dtype)
    y, y_ref = jit_call(layer, x), jit_call(linear, x)
    assert y.dtype == y_ref.dtype
    np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(y_ref, np.float32))
    assert dot_precisions(layer, x) == dot_precisions(linear, x) != {None}
    y_nm = jit_call(SRSTELinear(linear, n=NMLINEAR_N, m=NMLINEAR_M), x)
    assert y_nm.dtype == y_ref.dtype
    tol = 1e-5 if y_ref.dtype == jnp.float32 else 2e-2
    np.testing.assert_allclose(
        np.asarray(y_nm, np.float32), np.asarray(y_ref, np.float32), rtol=tol, atol=tol
    )
    back = layer.to_linear()
    nm = layer.to_nm()
    for other in (back, nm):
        for attr in ("dtype", "param_dtype", "precision", "preferred_element_type"):
            assert getattr(other, attr) == getattr(linear, attr), (type(other), attr)
    assert back.dot_general is linear.dot_general
    np.testing.assert_array_equal(back.kernel[...], linear.kernel[...])
    np.testing.assert_array_equal(nm.dense_kernel(), linear.kernel[...])
