"""examples/minilm: the NNX all-MiniLM-L6-v2 against an independent numpy forward and the
model card's published similarities, and the pruning script's ``--quick`` run."""

from __future__ import annotations

import json
import pathlib
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import erf

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "examples"))

from minilm import model as minilm  # noqa: E402

# The model card's quick-start output (sentence-transformers, PyTorch).
CARD_SENTENCES = [
    "The weather is lovely today.",
    "It's so sunny outside!",
    "He drove to the stadium.",
]
CARD_COSINES = {(0, 1): 0.6660, (0, 2): 0.1046, (1, 2): 0.1411}


@pytest.fixture(scope="module")
def pretrained():
    return minilm.load_pretrained()


@pytest.fixture(scope="module")
def state_dict():
    return minilm.load_state_dict()


def numpy_bert(w: dict[str, np.ndarray], ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """BERT straight from the PyTorch-named checkpoint, float64 numpy, one sentence at a
    time (no padding inside the computation), mean pooled and L2 normalised."""
    w = {k: v.astype(np.float64) for k, v in w.items()}

    def lin(x, name):
        return x @ w[name + ".weight"].T + w[name + ".bias"]

    def norm(x, name):
        mu = x.mean(-1, keepdims=True)
        var = ((x - mu) ** 2).mean(-1, keepdims=True)
        return (x - mu) / np.sqrt(var + 1e-12) * w[name + ".weight"] + w[name + ".bias"]

    out = []
    for row_ids, row_mask in zip(ids, mask, strict=True):
        tok = row_ids[row_mask > 0]
        n = len(tok)
        x = (
            w["embeddings.word_embeddings.weight"][tok]
            + w["embeddings.position_embeddings.weight"][:n]
            + w["embeddings.token_type_embeddings.weight"][0]
        )
        x = norm(x, "embeddings.LayerNorm")
        for i in range(6):
            p = f"encoder.layer.{i}."
            q = lin(x, p + "attention.self.query").reshape(n, 12, 32).transpose(1, 0, 2)
            k = lin(x, p + "attention.self.key").reshape(n, 12, 32).transpose(1, 0, 2)
            v = lin(x, p + "attention.self.value").reshape(n, 12, 32).transpose(1, 0, 2)
            s = q @ k.transpose(0, 2, 1) / np.sqrt(32.0)
            a = np.exp(s - s.max(-1, keepdims=True))
            a /= a.sum(-1, keepdims=True)
            ctx = (a @ v).transpose(1, 0, 2).reshape(n, 384)
            x = norm(x + lin(ctx, p + "attention.output.dense"), p + "attention.output.LayerNorm")
            h = lin(x, p + "intermediate.dense")
            h = 0.5 * h * (1.0 + erf(h / np.sqrt(2.0)))
            x = norm(x + lin(h, p + "output.dense"), p + "output.LayerNorm")
        e = x.mean(0)
        out.append(e / np.linalg.norm(e))
    return np.stack(out)


SENTENCES = CARD_SENTENCES + [
    "A much longer sentence, with punctuation; numbers like 1234 and rare words: "
    "photosynthesis, antidisestablishmentarianism.",
    "Hi",
]


def test_nnx_encoder_matches_numpy_forward(pretrained, state_dict):
    model, tok = pretrained
    ids, mask = minilm.tokenize(tok, SENTENCES)
    assert mask.sum(1).min() < ids.shape[1]  # the batch does pad: masking is exercised
    ref = numpy_bert(state_dict, ids, mask)
    got = minilm.embed(model, tok, SENTENCES)
    np.testing.assert_allclose(got, ref, atol=2e-5)
    # The hidden states of every layer: as many as layers + 1, the last one the output.
    states = model(jnp.asarray(ids), jnp.asarray(mask), hidden_states=True)
    assert len(states) == 7
    np.testing.assert_array_equal(states[-1], model(jnp.asarray(ids), jnp.asarray(mask)))


def test_published_cosines(pretrained):
    model, tok = pretrained
    emb = minilm.embed(model, tok, CARD_SENTENCES)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    for (i, j), cos in CARD_COSINES.items():
        assert abs(float(emb[i] @ emb[j]) - cos) < 1e-3, (i, j, float(emb[i] @ emb[j]))


def test_padding_does_not_change_embeddings(pretrained):
    model, tok = pretrained
    ids, mask = minilm.tokenize(tok, CARD_SENTENCES)
    wide_ids, wide_mask = minilm.tokenize(tok, CARD_SENTENCES, length=40)
    narrow = minilm.mean_pool(model(jnp.asarray(ids), jnp.asarray(mask)), jnp.asarray(mask))
    wide = minilm.mean_pool(
        model(jnp.asarray(wide_ids), jnp.asarray(wide_mask)), jnp.asarray(wide_mask)
    )
    np.testing.assert_allclose(narrow, wide, atol=1e-5)


def test_bad_input(pretrained):
    model, tok = pretrained
    with pytest.raises(ValueError, match="batch, tokens"):
        model(jnp.zeros((4,), jnp.int32), jnp.ones((4,), jnp.int32))
    with pytest.raises(ValueError, match="max_positions"):
        model(jnp.zeros((1, 513), jnp.int32), jnp.ones((1, 513), jnp.int32))
    with pytest.raises(TypeError, match="sequence of sentences"):
        minilm.tokenize(tok, "one string")
    with pytest.raises(ValueError, match="multiple of heads"):
        minilm.Config(hidden=100, heads=12)


@pytest.mark.slow
def test_prune_script_quick(tmp_path):
    """The end-to-end script's --quick run: prune, fine-tune, evaluate, time, report."""
    from minilm import prune_minilm

    results = prune_minilm.main(["--quick", "--out", str(tmp_path)])
    (variant,) = results["variants"]
    assert (variant["target"], variant["method"]) == ("70% 32x32", "wanda")
    # Every one of the 36 linear layers was pruned, to 70% in whole 32x32 blocks.
    errors = variant["prune"]["errors"]
    assert len(errors) == 36 and all(0 < e < 1 for e in errors.values())
    for path, sparsity in variant["prune"]["sparsities"].items():
        blocks = 144 if "/attention/" in path else 576  # 32x32 blocks of 384x384 or 384x1536
        assert abs(sparsity * blocks - round(sparsity * blocks)) < 1e-6, path  # whole blocks
        assert abs(sparsity - 0.7) < 0.05, path
    assert abs(variant["density"] - 0.3) < 0.04
    # The pruned linear layers are smaller than the dense ones (values + indices).
    assert variant["bytes"]["linear"] < 0.4 * results["dense"]["bytes"]["linear"]
    # Distillation ran and the quality numbers are real similarities.
    assert variant["finetune"]["steps"] == 2
    for q in (variant["oneshot"], variant["finetuned"]):
        assert -1 <= q["spearman"] <= 1 and -1 <= q["cosine"] <= 1
    assert results["speed"]["70% 32x32"]["sparse_s"] > 0
    saved = json.loads((tmp_path / "pruning_minilm.json").read_text())
    assert saved["variants"][0]["oneshot"] == variant["oneshot"]
    page = (tmp_path / "pruning_minilm.md").read_text()
    assert "70% 32x32" in page and "pruning_minilm.png" in page
    assert (tmp_path / "pruning_minilm.png").stat().st_size > 10_000


def test_spearman_and_quality():
    from minilm import prune_minilm

    a = np.array([0.1, 0.5, 0.3, 0.9])
    assert prune_minilm.spearman(a, a**3) == pytest.approx(1.0)
    assert prune_minilm.spearman(a, -a) == pytest.approx(-1.0)
    rng = np.random.default_rng(0)
    emb = rng.standard_normal((6, 8))
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    same = prune_minilm.quality(emb, emb)
    assert same["cosine"] == pytest.approx(1.0) and same["spearman"] == pytest.approx(1.0)
    flipped = prune_minilm.quality(-emb, emb)  # same similarities, opposite vectors
    assert flipped["cosine"] == pytest.approx(-1.0) and flipped["spearman"] == pytest.approx(1.0)
