"""A small causal transformer language model with MoE FFNs, for the sequence track.

Axis legend: b batch, t positions, d model width, v vocabulary, e experts, k tasks, q difficulty levels.

:class:`CausalLM` (from an :class:`LMConfig`): token + learned position embeddings, pre-norm blocks
of causal self-attention and a dense FFN or a :class:`~moe_lite.layers.MoE` (any router of
:data:`moe_lite.routers.ROUTERS` by name, as :class:`~moe_lite.models.vit.ViTConfig` takes them),
a final norm and a linear head: ``tokens [B, T] -> logits [B, T, V]``, where position ``t``
predicts token ``t + 1``. MoE layers are named ``"blocks.{i}.mlp"``, as in the ViT, so
:func:`moe_lite.models.vit.experts_per_token` and :class:`moe_lite.inspect.inference_threshold`
work on it unchanged.

:class:`SequenceTask` trains it with :func:`moe_lite.train.fit` on
:func:`moe_lite.sequences.make_sequence_loader` batches, cross-entropy on the answer tokens only.
:func:`accuracy_by_task_level` breaks per-token accuracy down by task and difficulty.

**Routers on a causal model.** Token-choice routers (top-k, top-p, hash, learned threshold,
bias-balanced) decide each token from its own logits: the model stays causal in training and eval.
Switch's capacity depends on the tokens before it in the flattened batch (never on later positions
of its own sequence). Routers where tokens *compete* are not causal, in training at least:

* ``race`` (Expert Race, candidates ``"BLE"``) picks the top ``B*T*k`` (token, expert) scores of
  the whole batch, so in training whether a token gets an expert depends on the scores of the
  other tokens of the batch, later positions of its own sequence included (a weak leak: only the
  selection carries it, and a later token can displace at most a few of the ``B*T*k`` selected
  pairs; ``tests/test_sequences.py`` shows it). In eval it compares every score with the EMA
  threshold learnt in training (``eval_threshold``, the default for ``"BLE"``): each token is routed on its own scores alone,
  independent of the batch and of later tokens, so autoregressive inference is causal and exact.
  Before any training batch there is no threshold and eval raises.
* ``expert_choice`` (groups per sample, over positions) lets every token of a sequence compete, in
  training *and* eval: it is not causal, do not use it for generation. ``balanced`` solves a
  batch-wide assignment in training.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..layers import FFN, MoE
from .blocks import Attention, Block
from ..routers import RouterSpec
from ..sequences import TASKS
from .vit import (Placement, RouterField, build_router, check_moe_fields, normalize_router_fields, resolve_placement,
                  router_spec_of)

__all__ = [
    "LMConfig",
    "CausalLM",
    "CausalAttention",
    "CausalBlock",
    "SequenceTask",
    "accuracy_by_task_level",
    "answer_logits",
]


@dataclass
class LMConfig:
    """Everything that defines a :class:`CausalLM` (MoE fields as in :class:`~moe_lite.models.vit.ViTConfig`).

    Attributes:
        vocab_size: tokens of the vocabulary (:data:`moe_lite.sequences.VOCAB` has 22).
        max_len: the longest input (positions with an embedding; :data:`moe_lite.sequences.SEQ_LEN`).
        dim, depth, heads, mlp_hidden: width, blocks, attention heads (``dim % heads == 0``), dense FFN width.
        dropout: on embeddings, attention probabilities and block outputs.
        activation: ``"gelu"`` or ``"swiglu"``.
        moe_layers: ``"none"``, ``"all"``, ``"every-N"``, ``"last-N"`` or a list of block indices
            (:func:`~moe_lite.models.vit.resolve_placement`).
        num_experts, expert_hidden: routed experts per MoE layer and their width (default ``mlp_hidden``).
        router: a router name (with ``router_kwargs``; ``None`` takes the router's defaults, ``k=2`` for
            the routers that need a k), a :class:`~moe_lite.routers.RouterSpec` (stored as that name and
            ``router_kwargs``), or a zero-argument factory; every MoE layer gets its own instance.
        num_shared, shared_hidden: always-on shared experts and their width.
        moe_losses: ``{loss name: weight}`` from :data:`moe_lite.losses.REGISTRY`.
        dispatch: expert dispatch backend passed to ``MoE``.
    """

    vocab_size: int = 22
    max_len: int = 24
    dim: int = 64
    depth: int = 4
    heads: int = 4
    mlp_hidden: int = 128
    dropout: float = 0.0
    activation: str = "gelu"
    moe_layers: Placement = "none"
    num_experts: int = 8
    expert_hidden: Optional[int] = None
    router: RouterField = "topk"
    router_kwargs: Optional[Dict[str, Any]] = None
    num_shared: int = 0
    shared_hidden: Optional[int] = None
    moe_losses: Dict[str, float] = field(default_factory=dict)
    dispatch: str = "auto"

    def __post_init__(self) -> None:
        normalize_router_fields(self, "LMConfig")
        for name in ("vocab_size", "max_len", "dim", "depth", "heads", "mlp_hidden", "num_experts"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"LMConfig.{name} must be a positive int, got {value!r}")
        if self.dim % self.heads:
            raise ValueError(f"LMConfig: dim {self.dim} is not divisible by heads {self.heads}")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise ValueError(f"LMConfig.dropout must be in [0, 1), got {self.dropout}")
        resolve_placement(self.moe_layers, self.depth)  # validates the placement
        check_moe_fields(self, "LMConfig")

    @property
    def moe_block_indices(self) -> list:
        """Sorted indices of the MoE blocks."""
        return resolve_placement(self.moe_layers, self.depth)

    @property
    def expert_width(self) -> int:
        return self.expert_hidden if self.expert_hidden is not None else self.mlp_hidden

    @property
    def router_spec(self) -> Optional[RouterSpec]:
        """The MoE layers' router as a :class:`~moe_lite.routers.RouterSpec` (None for a factory)."""
        return router_spec_of(self)

    def build_router(self) -> nn.Module:
        """A fresh router for one MoE layer (never shared between layers)."""
        return build_router(self)


class CausalAttention(Attention):
    """:class:`~moe_lite.models.blocks.Attention` with a causal mask: position ``t`` attends to
    positions ``<= t`` only. ``forward(x [B, T, D]) -> [B, T, D]``."""

    def __init__(self, dim: int, heads: int, dropout: float = 0.0) -> None:
        super().__init__(dim, heads, dropout, causal=True)


class CausalBlock(Block):
    """The pre-norm :class:`~moe_lite.models.blocks.Block` with :class:`CausalAttention`."""

    def __init__(self, dim: int, heads: int, mlp: nn.Module, dropout: float = 0.0, is_moe: bool = False) -> None:
        super().__init__(dim, heads, mlp, dropout, is_moe)
        self.attn = CausalAttention(dim, heads, dropout)


class CausalLM(nn.Module):
    """Decoder-only transformer: ``forward(tokens long [B, T]) -> logits [B, T, V]`` (``T <= max_len``).

    Attributes:
        config: the :class:`LMConfig`.
        blocks: :class:`CausalBlock` list; ``blocks[i].mlp`` is block i's FFN or MoE.
    """

    def __init__(self, config: Optional[LMConfig] = None) -> None:
        super().__init__()
        config = config if config is not None else LMConfig()
        if not isinstance(config, LMConfig):
            raise ValueError(f"CausalLM expects an LMConfig, got {type(config).__name__}")
        self.config = c = config
        self.moe_block_indices: Tuple[int, ...] = tuple(c.moe_block_indices)
        self.token_embed = nn.Embedding(c.vocab_size, c.dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, c.max_len, c.dim))
        self.drop = nn.Dropout(c.dropout)
        self.blocks = nn.ModuleList(
            CausalBlock(c.dim, c.heads, self._make_mlp(i), c.dropout, i in self.moe_block_indices)
            for i in range(c.depth))
        self.norm = nn.LayerNorm(c.dim)
        self.head = nn.Linear(c.dim, c.vocab_size)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.token_embed.weight, std=0.02)

    def _make_mlp(self, index: int) -> nn.Module:
        c = self.config
        if index not in self.moe_block_indices:
            return FFN(c.dim, c.mlp_hidden, activation=c.activation)
        shared = c.shared_hidden or c.expert_width
        return MoE(c.dim, c.expert_width, c.num_experts, c.build_router(), c.num_shared, activation=c.activation,
                   shared_hidden=shared if c.num_shared else None, losses=dict(c.moe_losses), dispatch=c.dispatch)

    def forward(self, tokens: Tensor) -> Tensor:
        if not isinstance(tokens, Tensor) or tokens.dim() != 2 or tokens.dtype != torch.long:
            raise ValueError(f"tokens must be a long tensor [B, T], got "
                             f"{getattr(tokens, 'dtype', type(tokens).__name__)} {tuple(getattr(tokens, 'shape', ()))}")
        t = tokens.shape[1]
        if t > self.config.max_len:
            raise ValueError(f"tokens has {t} positions, more than max_len={self.config.max_len}")
        x = self.drop(self.token_embed(tokens) + self.pos_embed[:, :t])  # [b, t, d]
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))  # [b, t, v]


def _batch(batch: Any) -> Tuple[Tensor, Tensor]:
    if isinstance(batch, (list, tuple)) and len(batch) >= 2:
        return batch[0], batch[1]
    raise TypeError("SequenceTask expects (tokens, mask, ...) batches from make_sequence_loader, got "
                    f"{type(batch).__name__}")


def answer_logits(logits: Tensor, tokens: Tensor, mask: Tensor) -> Tuple[Tensor, Tensor]:
    """The scored predictions: ``(logits [A, V], targets [A])`` for the ``A`` answer tokens, where
    the logits of position ``t`` predict token ``t + 1`` (``logits [B, T, V]``, ``tokens`` and
    ``mask`` ``[B, T]``)."""
    target_mask = mask[:, 1:]
    return logits[:, :-1][target_mask], tokens[:, 1:][target_mask]


@dataclass
class SequenceTask:
    """Next-token cross-entropy on the answer tokens only (prompt and padding are not scored).

    Batches are ``(tokens [B, T], mask [B, T], ...)`` (:func:`moe_lite.sequences.make_sequence_loader`;
    extra tensors such as task and difficulty are ignored here). ``loss`` logs the token accuracy;
    ``evaluate`` reports ``loss``, ``accuracy`` (per answer token), ``sequence_accuracy`` (every
    answer token right) and, with ``per_task``, ``accuracy/<task>`` (needs the task tensor, third).
    """

    per_task: bool = True

    def loss(self, model: nn.Module, batch: Any) -> Tuple[Tensor, Dict[str, Tensor]]:
        tokens, mask = _batch(batch)
        logits, targets = answer_logits(model(tokens), tokens, mask)
        loss = F.cross_entropy(logits.float(), targets)
        return loss, {"acc": (logits.detach().argmax(-1) == targets).float().mean()}

    @torch.no_grad()
    def evaluate(self, model: nn.Module, batches: Iterable[Any]) -> Dict[str, float]:
        sums = None
        for batch in batches:
            tokens, mask = _batch(batch)
            logits = model(tokens).float()
            target_mask = mask[:, 1:]
            hit = (logits[:, :-1].argmax(-1) == tokens[:, 1:]) & target_mask  # [b, t-1]
            loss = F.cross_entropy(logits[:, :-1].transpose(1, 2), tokens[:, 1:], reduction="none")
            row_ok = (hit | ~target_mask).all(1)  # [b]
            parts = [(loss * target_mask).sum(), hit.sum(), target_mask.sum(), row_ok.sum(),
                     torch.tensor(tokens.shape[0], device=tokens.device)]
            if self.per_task and len(batch) >= 3:
                task = batch[2][:, 1:]
                parts.append(torch.bincount(task[hit], minlength=len(TASKS))[:len(TASKS)])
                parts.append(torch.bincount(task[target_mask], minlength=len(TASKS))[:len(TASKS)])
            flat = torch.cat([p.reshape(-1).double() for p in parts])
            sums = flat if sums is None else sums + flat
        if sums is None:
            raise ValueError("SequenceTask.evaluate got no batches")
        v = sums.tolist()  # one host copy
        count = max(v[2], 1.0)
        metrics = {"loss": v[0] / count, "accuracy": v[1] / count, "sequence_accuracy": v[3] / max(v[4], 1.0)}
        if len(v) > 5:
            k = len(TASKS)
            for i, name in enumerate(TASKS):
                n = v[5 + k + i]
                metrics[f"accuracy/{name}"] = v[5 + i] / n if n else float("nan")
        return metrics


def accuracy_by_task_level(correct: Tensor, task: Tensor, difficulty: Tensor, num_tasks: int,
                           num_levels: int) -> Dict[str, Tensor]:
    """Per-token accuracy broken down by task and difficulty.

    Args:
        correct: bool ``[A]``, one entry per scored answer token.
        task, difficulty: long ``[A]``, its task id and level.
        num_tasks, num_levels: ``K`` and ``Q``.

    Returns:
        ``{"accuracy": float [K, Q] (nan where no token), "count": long [K, Q]}``.
    """
    if not (correct.shape == task.shape == difficulty.shape) or correct.dim() != 1:
        raise ValueError(f"correct, task and difficulty must be 1-D of one length, got {tuple(correct.shape)}, "
                         f"{tuple(task.shape)}, {tuple(difficulty.shape)}")
    if task.numel() and (int(task.min()) < 0 or int(task.max()) >= num_tasks):
        raise ValueError(f"task ids must be in [0, {num_tasks})")
    if difficulty.numel() and (int(difficulty.min()) < 0 or int(difficulty.max()) >= num_levels):
        raise ValueError(f"difficulty levels must be in [0, {num_levels})")
    cell = task * num_levels + difficulty
    count = torch.bincount(cell, minlength=num_tasks * num_levels).reshape(num_tasks, num_levels)
    hits = torch.bincount(cell[correct.bool()], minlength=num_tasks * num_levels).reshape(num_tasks, num_levels)
    accuracy = torch.where(count > 0, hits.double() / count.clamp_min(1), torch.full_like(hits, float("nan"),
                                                                                          dtype=torch.double))
    return {"accuracy": accuracy, "count": count}
