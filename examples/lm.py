"""A small numpy transformer language model, split for model parallelism (issue 10's workload).

Decoder-only, pre-LayerNorm, causal multi-head attention, GELU MLP, tied embeddings. The weights
are seeded and saved once as an ``.npz`` (:func:`make_weights`); every part loads only what it needs,
so a stage's lane holds only its own block:

    services:
      embed:  {handler: "ndpipe.examples.lm:Embed", init: {weights: /var/lib/ndpipe/lm.npz}}
      block0: {handler: "ndpipe.examples.lm:Block", init: {weights: /var/lib/ndpipe/lm.npz, layer: 0}}
      ...
      head:   {handler: "ndpipe.examples.lm:Head",  init: {weights: /var/lib/ndpipe/lm.npz}}
      lm:     {handler: "ndpipe.examples.lm:LM",    init: {weights: /var/lib/ndpipe/lm.npz}}   # whole model

Three ways to run it: data-parallel scoring (``m.map("lm", batches)``), model-parallel
(``m.pipeline_map(["embed", "block0", …, "head"], batches)``), and greedy generation streamed
token by token (``m.stream("generate", prompt, max_new_tokens=32)``); each is checked against the
model in one process (:func:`forward`, :func:`generate`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

Array = np.ndarray[Any, Any]


def make_weights(path: str, vocab: int = 512, width: int = 256, blocks: int = 4, heads: int = 4,
                 seed: int = 0) -> str:
    """Seeded weights, saved as ``path`` (.npz); returns ``path``."""
    rng = np.random.default_rng(seed)
    w: dict[str, Array] = {"embed": rng.standard_normal((vocab, width)) * 0.02,
                           "meta": np.array([vocab, width, blocks, heads])}
    for i in range(blocks):
        for name, shape in (("wq", (width, width)), ("wk", (width, width)), ("wv", (width, width)),
                            ("wo", (width, width)), ("w1", (width, 4 * width)), ("w2", (4 * width, width))):
            w[f"b{i}.{name}"] = rng.standard_normal(shape) / np.sqrt(shape[0])
        for name in ("ln1", "ln2"):
            w[f"b{i}.{name}.g"], w[f"b{i}.{name}.b"] = np.ones(width), np.zeros(width)
    w["lnf.g"], w["lnf.b"] = np.ones(width), np.zeros(width)
    np.savez(path, **w)  # type: ignore[arg-type]  # numpy's stub types **kwds as its bool flag
    return path


def _load(path: str, prefix: str) -> dict[str, Array]:
    with np.load(path) as npz:
        return {k: np.array(npz[k]) for k in npz.files if k.startswith(prefix) or k == "meta"}


def layer_norm(x: Array, g: Array, b: Array) -> Array:
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    out: Array = (x - mu) / np.sqrt(var + 1e-5) * g + b
    return out


def gelu(x: Array) -> Array:
    return 0.5 * x * (1.0 + np.tanh(0.7978845608028654 * (x + 0.044715 * x**3)))


def positions(seq: int, width: int) -> Array:
    pos = np.arange(seq)[:, None] / (10000 ** (np.arange(0, width, 2)[None, :] / width))
    out = np.zeros((seq, width))
    out[:, 0::2], out[:, 1::2] = np.sin(pos), np.cos(pos)
    return out


class Embed:
    """Stage 0: token ids (batch, seq) -> hidden states (batch, seq, width)."""

    def __init__(self, weights: str) -> None:
        self.table = _load(weights, "embed")["embed"]

    def __call__(self, tokens: Any) -> Array:
        ids = np.asarray(tokens, dtype=np.int64)
        return self.table[ids] + positions(ids.shape[-1], self.table.shape[1])


class Block:
    """One transformer block, holding only its own weights (layer ``layer``)."""

    def __init__(self, weights: str, layer: int) -> None:
        w = _load(weights, f"b{layer}.")
        if f"b{layer}.wq" not in w:
            raise ValueError(f"{weights} has no block {layer} (it has {int(w['meta'][2])} blocks)")
        self.w = {k.split(".", 1)[1]: v for k, v in w.items() if k != "meta"}
        self.heads = int(w["meta"][3])

    def __call__(self, h: Array) -> Array:
        w, (batch, seq, width) = self.w, h.shape
        x = layer_norm(h, w["ln1.g"], w["ln1.b"])
        split = (batch, seq, self.heads, width // self.heads)
        q, k, v = ((x @ w[n]).reshape(split).transpose(0, 2, 1, 3) for n in ("wq", "wk", "wv"))
        scores = q @ k.transpose(0, 1, 3, 2) / np.sqrt(width // self.heads)
        scores = np.where(np.tril(np.ones((seq, seq), bool)), scores, -np.inf)  # causal
        scores = np.exp(scores - scores.max(-1, keepdims=True))
        att = (scores / scores.sum(-1, keepdims=True)) @ v
        h = h + att.transpose(0, 2, 1, 3).reshape(batch, seq, width) @ w["wo"]
        out: Array = h + gelu(layer_norm(h, w["ln2.g"], w["ln2.b"]) @ w["w1"]) @ w["w2"]
        return out


class Head:
    """The last stage: final LayerNorm and the tied unembedding -> logits (batch, seq, vocab)."""

    def __init__(self, weights: str) -> None:
        w = _load(weights, "")
        self.table, self.g, self.b = w["embed"], w["lnf.g"], w["lnf.b"]

    def __call__(self, h: Array) -> Array:
        return layer_norm(h, self.g, self.b) @ self.table.T


class LM:
    """The whole model in one resident service (data parallelism: every lane holds all of it)."""

    def __init__(self, weights: str) -> None:
        blocks = int(_load(weights, "meta")["meta"][2])
        self.parts: list[Callable[[Any], Any]] = [Embed(weights), *(Block(weights, i) for i in range(blocks)),
                                                  Head(weights)]

    def __call__(self, tokens: Any) -> Array:
        x: Any = tokens
        for part in self.parts:
            x = part(x)
        return np.asarray(x)


class Generate:
    """Greedy generation, token by token, as a generator: a stream service (``Master.stream``).
    Each step runs the whole model on the tokens so far and yields the most likely next token."""

    def __init__(self, weights: str) -> None:
        self.model = LM(weights)

    def __call__(self, prompt: Any, max_new_tokens: int = 16) -> Iterator[int]:
        tokens = [int(t) for t in np.asarray(prompt).reshape(-1)]
        for _ in range(max_new_tokens):
            nxt = int(self.model(np.array([tokens]))[0, -1].argmax())
            tokens.append(nxt)
            yield nxt


def generate(weights: str, prompt: Any, max_new_tokens: int = 16) -> list[int]:
    """The reference: greedy generation in this process."""
    return list(Generate(weights)(prompt, max_new_tokens))


def forward(weights: str, tokens: Any) -> Array:
    """The reference: the whole model in this process."""
    return LM(weights)(tokens)


def stages(weights: str) -> list[str]:
    """The service names of the model-parallel pipeline for these weights: embed, block0.., head."""
    blocks = int(_load(weights, "meta")["meta"][2])
    return ["embed", *(f"block{i}" for i in range(blocks)), "head"]


def services(weights: str) -> dict[str, Any]:
    """The ``worker.services`` entries that serve this model both ways (YAML-ready)."""
    out: dict[str, Any] = {"embed": {"handler": "ndpipe.examples.lm:Embed", "init": {"weights": weights}},
                           "head": {"handler": "ndpipe.examples.lm:Head", "init": {"weights": weights}},
                           "lm": {"handler": "ndpipe.examples.lm:LM", "init": {"weights": weights}},
                           "generate": {"handler": "ndpipe.examples.lm:Generate", "init": {"weights": weights}}}
    for name in stages(weights)[1:-1]:
        out[name] = {"handler": "ndpipe.examples.lm:Block", "init": {"weights": weights, "layer": int(name[5:])}}
    return out
