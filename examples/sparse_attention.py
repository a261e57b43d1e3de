"""Sparse attention (local window + a global token) against dense attention, on a task
where locality matters.

The task: packed "documents" of ``W`` tokens, each with its own dictionary. Position 0
holds a global token ``s`` (a shift). Every other token is either a *pair* ``(key,
value)`` that defines the current document's dictionary, or a *query* ``key`` asking
for the value of that key in the current document, answered as ``(value + s) mod V``.
Documents alternate between two disjoint key sets, so inside a causal window of ``W``
positions a key is unambiguous; further back (documents ``2, 4, ...`` before) the same
keys carry other values: distractors.

Three models, the same two-layer transformer (pre-LN, learned positions) trained the
same way, differ only in their attention layer:

- ``dense``: ``nnx.MultiHeadAttention``, causal, over every earlier position (it sees
  the distractors);
- ``local``: ``causal() & local(W - 1)``, block-sparse (cannot read the shift);
- ``local+global``: ``causal() & (local(W - 1) | global_tokens(1))``, block-sparse.

The sparse ones are ``jsparse.nn.SparseMultiHeadAttention`` (same parameters as the
dense layer) running ``jsparse.attention.block_sparse_attention``.

It prints a table of query accuracy, training-step time (median) and the compiled
train step's temporary memory (``compiled.memory_analysis()``).

    python examples/sparse_attention.py            # L = 1024, a few minutes on 2 cores
    python examples/sparse_attention.py --quick    # L = 128, ~20 s: a smoke run
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import jsparse.attention as ja
from jsparse.nn import SparseMultiHeadAttention

KEYS = 16  # two disjoint sets of 8, alternating between documents
VALUES = 8
SHIFTS = 4
PAIR0, QUERY0, SHIFT0 = 0, KEYS * VALUES, KEYS * VALUES + KEYS
VOCAB = SHIFT0 + SHIFTS
METHODS = ("dense", "local", "local+global")


# ------------------------------------------------------------------ data
def make_batch(rng: np.random.Generator, batch: int, length: int, window: int):
    """``(tokens, targets, weights)``, each ``(batch, length)``; weights mark queries."""
    tokens = np.zeros((batch, length), np.int32)
    targets = np.zeros((batch, length), np.int32)
    weights = np.zeros((batch, length), np.float32)
    half = KEYS // 2
    for b in range(batch):
        shift = rng.integers(SHIFTS)
        tokens[b, 0] = SHIFT0 + shift
        for start in range(1, length, window):
            doc = (start - 1) // window
            keys = np.arange(half) + half * (doc % 2)
            values = rng.integers(VALUES, size=half)
            seen: list[int] = []
            for j in range(start, min(start + window, length)):
                if seen and rng.random() < 0.3:
                    k = seen[rng.integers(len(seen))]
                    tokens[b, j] = QUERY0 + keys[k]
                    targets[b, j] = (values[k] + shift) % VALUES
                    weights[b, j] = 1.0
                else:
                    k = int(rng.integers(half))
                    seen.append(k)
                    tokens[b, j] = PAIR0 + keys[k] * VALUES + values[k]
    return tokens, targets, weights


# ------------------------------------------------------------------ model
class Block(nnx.Module):
    def __init__(self, dim, heads, mask, block_size, rngs):
        self.ln1 = nnx.LayerNorm(dim, rngs=rngs)
        if mask is None:
            self.attn = nnx.MultiHeadAttention(heads, dim, decode=False, rngs=rngs)
        else:
            self.attn = SparseMultiHeadAttention(
                heads, dim, mask=mask, block_size=block_size, decode=False, rngs=rngs
            )
        self.causal = mask is None
        self.ln2 = nnx.LayerNorm(dim, rngs=rngs)
        self.mlp1 = nnx.Linear(dim, 4 * dim, rngs=rngs)
        self.mlp2 = nnx.Linear(4 * dim, dim, rngs=rngs)

    def __call__(self, x):
        h = self.ln1(x)
        x = x + (self.attn(h, is_causal=True) if self.causal else self.attn(h))
        return x + self.mlp2(jax.nn.gelu(self.mlp1(self.ln2(x))))


class Transformer(nnx.Module):
    def __init__(self, length, mask, *, dim=64, heads=4, depth=2, block_size, rngs):
        self.embed = nnx.Embed(VOCAB, dim, rngs=rngs)
        self.pos = nnx.Param(0.02 * jax.random.normal(rngs.params(), (length, dim)))
        self.blocks = nnx.List([Block(dim, heads, mask, block_size, rngs) for _ in range(depth)])
        self.ln = nnx.LayerNorm(dim, rngs=rngs)
        self.head = nnx.Linear(dim, VALUES, rngs=rngs)

    def __call__(self, tokens):
        x = self.embed(tokens) + self.pos[...]
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln(x))


def attention_mask(method: str, window: int):
    causal = ja.causal()
    if method == "dense":
        return None  # nnx.MultiHeadAttention(is_causal=True)
    if method == "local":
        return causal & ja.local(window - 1)
    return causal & (ja.local(window - 1) | ja.global_tokens(1))


# ------------------------------------------------------------------ training
def train(method, *, length, window, block, steps, batch, lr, seed):
    model = Transformer(length, attention_mask(method, window), block_size=(block, block),
                        rngs=nnx.Rngs(seed))  # fmt: skip
    optimizer = nnx.Optimizer(model, optax.adam(lr), wrt=nnx.Param)

    def loss_fn(model, tokens, targets, weights):
        logits = model(tokens)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
        return jnp.sum(ce * weights) / jnp.sum(weights)

    @nnx.jit
    def step(model, optimizer, tokens, targets, weights):
        loss, grads = nnx.value_and_grad(loss_fn)(model, tokens, targets, weights)
        optimizer.update(model, grads)
        return loss

    @nnx.jit
    def accuracy(model, tokens, targets, weights):
        hit = jnp.argmax(model(tokens), -1) == targets
        return jnp.sum(hit * weights) / jnp.sum(weights)

    rng = np.random.default_rng(seed)
    data = [make_batch(rng, batch, length, window) for _ in range(8)]
    graphdef, state = nnx.split((model, optimizer))

    def pure_step(state, *arrays):
        m, o = nnx.merge(graphdef, state)
        return step(m, o, *arrays)

    compiled = jax.jit(pure_step).lower(state, *data[0]).compile()
    temp_bytes = compiled.memory_analysis().temp_size_in_bytes
    times = []
    for i in range(steps):
        tokens, targets, weights = (
            data[i % len(data)] if i < 8 else make_batch(rng, batch, length, window)
        )
        start = time.perf_counter()
        step(model, optimizer, tokens, targets, weights).block_until_ready()
        times.append(time.perf_counter() - start)
    test = [make_batch(np.random.default_rng(seed + 1000 + i), batch, length, window)
            for i in range(4)]  # fmt: skip
    acc = float(np.mean([accuracy(model, *t) for t in test]))
    step_s = statistics.median(times[1:]) if len(times) > 1 else times[0]
    return {"method": method, "accuracy": acc, "step_ms": 1e3 * step_s,
            "temp_mib": temp_bytes / 2**20}  # fmt: skip


def print_table(rows, length, window):
    print(f"\nL = {length}, window = {window}, causal; chance accuracy = {1 / VALUES:.3f}\n")
    head = f"{'attention':<14} {'accuracy':>9} {'step (ms)':>10} {'temp memory (MiB)':>18}"
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['method']:<14} {r['accuracy']:>9.3f} {r['step_ms']:>10.1f} "
              f"{r['temp_mib']:>18.1f}")  # fmt: skip


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a ~20 s smoke run (L = 128)")
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--window", type=int, default=64, help="document length = window")
    parser.add_argument("--block", type=int, default=64, help="attention block size")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    args = parser.parse_args(argv)
    if args.quick:
        args.length, args.window, args.block, args.steps = 128, 16, 16, 30
    rows = [
        train(m, length=args.length, window=args.window, block=args.block, steps=args.steps,
              batch=args.batch, lr=args.lr, seed=args.seed)
        for m in args.methods
    ]  # fmt: skip
    print_table(rows, args.length, args.window)
    return rows


if __name__ == "__main__":
    main()
