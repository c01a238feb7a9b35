"""Padding-free BERT inference: the encoder's linear layers run on the packed [real tokens x hidden] matrix.

A micro-batch of a mixed stream holds 17-token titles beside 128-token reviews. The padded path
(``model(input_ids, attention_mask)``) sorts and chunks them, but every chunk is still padded to its
longest row, and the padding costs as much as real tokens in every linear layer, which are nearly all
of the FLOPs. Here, as text-embeddings-inference does on GPUs with varlen attention:

- embeddings, the fused query/key/value projection, the attention output projection, the feed-forward
  block and the LayerNorms run once over the packed tokens of the whole batch (one large GEMM each, which
  is also where a CPU's GEMM is most efficient);
- attention, the only part that mixes tokens, runs per group of similar-length rows, scattered into a
  padded [rows, heads, longest, head_dim] block and gathered back (PyTorch SDPA with a key mask). Groups
  are small (:data:`ATTENTION_TOKENS` padded tokens): SDPA's CPU kernels are slow at e5-small's 32-wide
  heads, so padding there costs more than its FLOP share suggests;
- the last layer computes only what the classifier reads: keys and values of every token, but the query,
  attention output and feed-forward block of the [CLS] rows alone (10/12 of a layer's linear work saved).

Numerically it is the padded model's computation minus the padding (fp32 logits agree to ~1e-5). It is
used for ``BertForSequenceClassification`` (what the trainer publishes, the mean-pooling layer included);
:func:`unsupported` says why another model keeps the padded path.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
import torch.nn.functional as F

# Padded tokens per attention group: small enough that little padding is attended over, large enough that
# a group's SDPA call is not dominated by its fixed cost (experiments/alternatives.py compares sizes).
ATTENTION_TOKENS = 256


def unsupported(model: torch.nn.Module) -> str | None:
    """Why ``model`` cannot run packed (None when it can)."""
    config = getattr(model, "config", None)
    if type(model).__name__ != "BertForSequenceClassification" or getattr(config, "model_type", "") != "bert":
        return f"{type(model).__name__} is not a BertForSequenceClassification"
    if getattr(config, "position_embedding_type", "absolute") != "absolute":
        return f"position_embedding_type={config.position_embedding_type}"
    if getattr(config, "is_decoder", False):
        return "a decoder"
    if getattr(model.bert, "pooler", None) is None:
        return "no pooler"
    return None


class _Layer:
    """One encoder layer's weights, query/key/value fused into one projection."""

    def __init__(self, layer):
        attention = layer.attention.self
        self.qkv_weight = torch.cat([attention.query.weight, attention.key.weight, attention.value.weight])
        self.qkv_bias = torch.cat([attention.query.bias, attention.key.bias, attention.value.bias])
        self.heads = attention.num_attention_heads
        self.scale = float(getattr(attention, "scaling", attention.attention_head_size ** -0.5))
        self.attention_output = layer.attention.output  # dense, LayerNorm
        self.intermediate = layer.intermediate  # dense + activation
        self.output = layer.output  # dense, LayerNorm


class _Group:
    """A run of consecutive rows whose attention is computed together, padded to the longest."""

    __slots__ = ("start", "end", "rows", "length", "scatter", "mask")

    def __init__(self, start: int, end: int, lengths: Sequence[int], device: torch.device):
        self.start, self.end = start, end  # token range in the packed matrix
        self.rows, self.length = len(lengths), max(lengths)
        if all(n == self.length for n in lengths):
            self.scatter = self.mask = None  # no padding: the packed slice is the padded block
        else:
            self.scatter = torch.cat([torch.arange(i * self.length, i * self.length + n)
                                      for i, n in enumerate(lengths)]).to(device)
            keep = torch.zeros(self.rows * self.length, dtype=torch.bool, device=device)
            keep[self.scatter] = True
            self.mask = keep.view(self.rows, 1, 1, self.length)

    def padded(self, packed: torch.Tensor) -> torch.Tensor:
        """[tokens, width] of this group -> [rows * longest, width], zeros where padding."""
        if self.scatter is None:
            return packed
        out = packed.new_zeros(self.rows * self.length, packed.shape[-1])
        out[self.scatter] = packed
        return out


class PackedBert:
    """Classifies token-id rows with a ``BertForSequenceClassification``'s weights, padding-free."""

    def __init__(self, model: torch.nn.Module, attention_tokens: int = ATTENTION_TOKENS):
        why = unsupported(model)
        if why:
            raise ValueError(f"cannot run packed: {why}")
        self.embeddings = model.bert.embeddings
        self.layers = [_Layer(layer) for layer in model.bert.encoder.layer]
        self.pooler, self.classifier = model.bert.pooler, model.classifier
        self.attention_tokens = attention_tokens
        self.device = next(model.parameters()).device

    @torch.inference_mode()
    def logits(self, rows: Sequence[Sequence[int]]) -> torch.Tensor:
        """[len(rows), labels] logits. Rows are best sorted by length (groups then pad least)."""
        lengths = [len(r) for r in rows]
        if min(lengths) < 1:
            raise ValueError("every row needs at least one token")
        starts = [0, *itertools.accumulate(lengths)]
        device = self.device
        ids = torch.tensor(list(itertools.chain.from_iterable(rows)), device=device)
        positions = torch.cat([torch.arange(n) for n in lengths]).to(device)
        e = self.embeddings
        x = e.word_embeddings(ids) + e.position_embeddings(positions) + e.token_type_embeddings.weight[0]
        x = e.LayerNorm(x)
        groups = self._groups(lengths, starts)
        first = torch.tensor(starts[:-1], device=device)  # the [CLS] row of each sequence
        for layer in self.layers[:-1]:
            x = self._layer(layer, x, groups)
        x = self._last_layer(self.layers[-1], x, groups, first)
        pooled = self.pooler.activation(self.pooler.dense(x))
        return self.classifier(pooled)

    def _groups(self, lengths: list[int], starts: list[int]) -> list[_Group]:
        groups, i = [], 0
        while i < len(lengths):
            j, longest = i + 1, lengths[i]
            while j < len(lengths) and (j - i + 1) * max(longest, lengths[j]) <= self.attention_tokens:
                longest = max(longest, lengths[j])
                j += 1
            groups.append(_Group(starts[i], starts[j], lengths[i:j], self.device))
            i = j
        return groups

    def _attend(self, layer: _Layer, q: torch.Tensor, kv: torch.Tensor, g: _Group) -> torch.Tensor:
        """q: [rows, q_len, hidden] (q_len = g.length or 1), kv: [rows * g.length, 2 * hidden] padded."""
        h = layer.heads
        rows, q_len, hidden = q.shape
        q = q.view(rows, q_len, h, hidden // h).transpose(1, 2)
        k, v = kv.view(rows, g.length, 2, h, hidden // h).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=g.mask, scale=layer.scale)
        return out.transpose(1, 2).reshape(rows * q_len, hidden)

    def _layer(self, layer: _Layer, x: torch.Tensor, groups: list[_Group]) -> torch.Tensor:
        hidden = x.shape[-1]
        qkv = F.linear(x, layer.qkv_weight, layer.qkv_bias)
        context = torch.empty_like(x)
        for g in groups:
            block = g.padded(qkv[g.start:g.end])
            out = self._attend(layer, block[:, :hidden].view(g.rows, g.length, hidden), block[:, hidden:], g)
            context[g.start:g.end] = out if g.scatter is None else out[g.scatter]
        return self._feed_forward(layer, context, x)

    def _last_layer(self, layer: _Layer, x: torch.Tensor, groups: list[_Group],
                    first: torch.Tensor) -> torch.Tensor:
        """Only the [CLS] rows leave the encoder, so only their queries and feed-forward are computed."""
        hidden = x.shape[-1]
        kv = F.linear(x, layer.qkv_weight[hidden:], layer.qkv_bias[hidden:])
        cls = x[first]
        q = F.linear(cls, layer.qkv_weight[:hidden], layer.qkv_bias[:hidden])
        context, row = torch.empty_like(cls), 0
        for g in groups:
            block = g.padded(kv[g.start:g.end])
            context[row:row + g.rows] = self._attend(layer, q[row:row + g.rows].unsqueeze(1), block, g)
            row += g.rows
        return self._feed_forward(layer, context, cls)

    @staticmethod
    def _feed_forward(layer: _Layer, context: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        attention_output = layer.attention_output
        x = attention_output.LayerNorm(attention_output.dense(context) + residual)
        return layer.output.LayerNorm(layer.output.dense(layer.intermediate(x)) + x)
