"""Routing inspection: everything model-wide that reads what the MoE layers routed, in one place.

Axis legend: b batch, l tokens per sample, n = b*l flat tokens, e experts, c label values,
s samples seen over many forwards, k slots.

* The last forward: :func:`last_routings` (``{layer: Routing}``), :func:`experts_per_token`,
  :func:`experts_per_sample`; per routing, :func:`top_experts` / :func:`primary_expert`.
* Many forwards: ``with record_routing(model, labels=...) as rec:`` hooks every routed MoE layer
  and accumulates its routing, broken down by any per-sample or per-token label (class, timestep
  bucket, position, task): :class:`RoutingRecord`.
* Thresholds that move after training (TopP's ``p``, Race's EMA threshold, LoRAExperts'
  inference threshold: every module implementing :class:`~moe_lite.routers.InferenceThreshold`):
  :func:`inference_thresholds` reads them; :class:`inference_threshold` sets them, and as a context
  manager restores them on exit.

``moe_layers`` and ``routing_stats`` (the per-layer summary of the last forward) are the collectors
of :mod:`moe_lite.layers`, re-exported here.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Tuple, Type, Union

import torch
from torch import Tensor, nn

from .layers import moe_layers, routing_stats
from .routers import InferenceThreshold
from .routing import Routing, by_label

__all__ = [
    "moe_layers",
    "routing_stats",
    "last_routings",
    "experts_per_token",
    "experts_per_sample",
    "top_experts",
    "primary_expert",
    "Label",
    "timestep_buckets",
    "timestep_label",
    "position_label",
    "RoutingRecord",
    "record_routing",
    "threshold_modules",
    "inference_thresholds",
    "inference_threshold",
]


# ---- the last forward --------------------------------------------------------------------------------
def _routed_layers(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    """``[(name, layer)]`` of the MoE layers with a discrete router (SoftMoE, a soft mix, is left out)."""
    return [(name, layer) for name, layer in moe_layers(model) if getattr(layer, "router", None) is not None]


def last_routings(model: nn.Module) -> Dict[str, Routing]:
    """``{layer name: Routing}`` of every routed MoE layer's last forward, in model order.

    Raises:
        ValueError: the model has no routed MoE layer, or one has not run a forward yet.
    """
    out = {}
    for name, layer in _routed_layers(model):
        routing = getattr(layer, "routing", None)
        if routing is None:
            raise ValueError(f"MoE layer {name!r} has no routing yet: run a forward pass first")
        out[name] = routing
    if not out:
        raise ValueError(f"{type(model).__name__} has no routed MoE layer")
    return out


def experts_per_token(model: nn.Module) -> Dict[str, Tensor]:
    """``{layer name: long [B, L]}``: experts each token used in the last forward (0 = none).

    L counts every token the layer saw (a ViT's ``cls`` token first with ``pooling="cls"``).
    """
    return {name: r.experts_per_token.reshape(r.batch_size, r.seq_len) for name, r in last_routings(model).items()}


def experts_per_sample(model: nn.Module) -> Dict[str, Tensor]:
    """``{layer name: float [B]}``: mean experts per token of each sample in the last forward."""
    return {name: ept.float().mean(dim=1) for name, ept in experts_per_token(model).items()}


def top_experts(routing: Routing, k: int = 1) -> Tensor:
    """long ``[B, L, k]``: each token's ``k`` highest-weight experts, highest first.

    Ties go to the lower expert index; ``-1`` fills the slots of a token with fewer than ``k``
    experts (all of them for a dropped / skipped token).
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be an int >= 1, got {k!r}")
    for attr in ("token", "expert", "weight", "num_experts"):
        if not hasattr(routing, attr):
            raise TypeError(f"expected a moe_lite.Routing, got {type(routing).__name__}")
    n, e = routing.num_tokens, routing.num_experts
    dense = torch.full((n, e), float("-inf"), device=routing.weight.device)  # [n, e]; -inf: not assigned
    dense[routing.token, routing.expert] = routing.weight.detach().float()
    taken = torch.zeros(n, e, dtype=torch.bool, device=routing.token.device)
    taken[routing.token, routing.expert] = True
    kk = min(k, e)
    order = dense.sort(dim=-1, descending=True, stable=True).indices[:, :kk]  # [n, kk]
    top = torch.where(taken.gather(1, order), order, torch.full_like(order, -1))
    if kk < k:
        top = torch.cat([top, top.new_full((n, k - kk), -1)], dim=1)
    return top.reshape(routing.batch_size, routing.seq_len, k)


def primary_expert(routing: Routing) -> Tensor:
    """long ``[B, L]``: each token's highest-weight expert, ``-1`` if it has none
    (``top_experts(routing, 1)[..., 0]``; e.g. the input of ``viz.patch_expert_overlay``)."""
    return top_experts(routing, 1)[..., 0]


# ---- labels ----------------------------------------------------------------------------------------------
#: ``read(model, routing) -> labels``: long ``[B]``, ``[L]``, ``[B, L]`` or ``[N]`` (as :func:`moe_lite.by_label`)
LabelReader = Callable[[nn.Module, Routing], Tensor]


@dataclass(frozen=True)
class Label:
    """A label the recorder breaks the routing down by: ``num_labels`` values ``[0, num_labels)``.

    ``read``: how to get a forward's labels from the model and a layer's routing (e.g. the DiT's
    timestep bucket, the token position); ``None``: the caller gives them before each forward with
    :meth:`RoutingRecord.set_labels` (e.g. the class of each image in the batch).
    """

    num_labels: int
    read: Optional[LabelReader] = None

    def __post_init__(self) -> None:
        if isinstance(self.num_labels, bool) or not isinstance(self.num_labels, int) or self.num_labels < 1:
            raise ValueError(f"Label.num_labels must be a positive int, got {self.num_labels!r}")
        if self.read is not None and not callable(self.read):
            raise ValueError(f"Label.read must be None or callable(model, routing), got {type(self.read).__name__}")


def timestep_buckets(t: Tensor, num_buckets: int = 10) -> Tensor:
    """Bucket index ``floor(t * num_buckets)`` of diffusion times ``t`` in [0, 1] (t = 1 in the last
    bucket): long, t's shape."""
    if num_buckets < 1:
        raise ValueError(f"num_buckets must be >= 1, got {num_buckets}")
    return (t.float() * num_buckets).long().clamp(0, num_buckets - 1)


def timestep_label(num_buckets: int = 10) -> Label:
    """Each sample's diffusion-time bucket, read off the model's ``last_timesteps`` ``[B]`` (a DiT
    records the ``t`` of its forward there). Bucket i covers t in [i/n, (i+1)/n)."""
    def read(model: nn.Module, routing: Routing) -> Tensor:
        t = getattr(model, "last_timesteps", None)
        if t is None:
            raise ValueError(f"{type(model).__name__} records no last_timesteps: it is not a diffusion model")
        return timestep_buckets(t, num_buckets)

    return Label(num_buckets, read)


def position_label(num_positions: int) -> Label:
    """Each token's position ``[0, L)`` in its sample (patch index, sequence position)."""
    return Label(num_positions, lambda model, routing: torch.arange(routing.seq_len))


# ---- recording many forwards ------------------------------------------------------------------------------
class RoutingRecord:
    """The routing of every routed MoE layer accumulated over the forwards of a :func:`record_routing`
    block. Counts are exact integers (int64); statistics are derived from them on demand.

    Per layer (``{layer: ...}``, layers in model order): :attr:`tokens` (tokens seen; a token counts
    once per forward), :meth:`tokens_per_expert` (assignments ``[E]``), :meth:`per_layer` (mean
    experts per token), :meth:`experts_per_sample` (``[S]``, every sample of every forward in order).
    Overall: :attr:`experts_per_token`, :attr:`relative_compute`. Per label: :meth:`by_label`
    (layer -> ``counts [C, E]``, ``fraction``, ``tokens [C]``, ``experts_per_token [C]``,
    ``dropped_fraction [C]``, the keys of :func:`moe_lite.by_label`, which one forward reproduces)
    and :meth:`experts_per_token_by` (``[C]`` over all layers).
    """

    def __init__(self, labels: Mapping[str, Label], per_sample: bool = True, nominal_k: Optional[float] = None):
        self.labels = dict(labels)
        self.per_sample = bool(per_sample)
        #: the nominal routed experts per token (e.g. a DiT's ``config.k``), for :attr:`relative_compute`
        self.nominal_k = nominal_k
        self.layers: List[str] = []
        self.tokens: Dict[str, int] = {}
        self.forwards: Dict[str, int] = {}
        self._assigned: Dict[str, Tensor] = {}  # layer -> long [E]
        self._by_label: Dict[str, Dict[str, Dict[str, Tensor]]] = {name: {} for name in self.labels}
        self._samples: Dict[str, List[Tensor]] = {}
        self._given: Dict[str, Tensor] = {}  # labels given for the next forward

    # -- labels given by the caller --
    def set_labels(self, values: Optional[Mapping[str, Tensor]] = None, **kwargs: Tensor) -> None:
        """Labels of the next forward (``{name: long [B], [L], [B, L] or [N]}``, or keywords) for the
        labels declared without a ``read``; they are cleared after that forward of the model."""
        given = {**(values or {}), **kwargs}
        for name in given:
            if name not in self.labels:
                raise ValueError(f"unknown label {name!r}; declared: {sorted(self.labels)}")
            if self.labels[name].read is not None:
                raise ValueError(f"label {name!r} is read off the model; it cannot be given")
        self._given.update({name: torch.as_tensor(v) for name, v in given.items()})

    def _clear_given(self) -> None:
        self._given.clear()

    # -- accumulation (from the layer hooks) --
    def add(self, model: nn.Module, name: str, routing: Routing) -> None:
        """Accumulate one forward's ``routing`` of layer ``name``."""
        if name not in self.tokens:
            self.layers.append(name)
            self.tokens[name], self.forwards[name] = 0, 0
            self._assigned[name] = torch.zeros(routing.num_experts, dtype=torch.long)
            self._samples[name] = []
        self.tokens[name] += routing.num_tokens
        self.forwards[name] += 1
        self._assigned[name] += routing.tokens_per_expert.long().cpu()
        if self.per_sample:
            ept = routing.experts_per_token.reshape(routing.batch_size, routing.seq_len)
            self._samples[name].append(ept.float().mean(dim=1).cpu())
        for label, spec in self.labels.items():
            if spec.read is not None:
                values = spec.read(model, routing)
            elif label in self._given:
                values = self._given[label]
            else:
                raise ValueError(f"label {label!r} has no values for this forward: call "
                                 f"rec.set_labels({{{label!r}: labels}}) before each forward")
            part = by_label(routing, torch.as_tensor(values).to(routing.token.device), spec.num_labels)
            tokens = part["tokens"].long().cpu()
            acc = self._by_label[label].setdefault(name, {
                "counts": torch.zeros(spec.num_labels, routing.num_experts, dtype=torch.long),
                "tokens": torch.zeros(spec.num_labels, dtype=torch.long),
                "dropped": torch.zeros(spec.num_labels, dtype=torch.long)})
            acc["counts"] += part["counts"].long().cpu()
            acc["tokens"] += tokens
            acc["dropped"] += (part["dropped_fraction"].nan_to_num(0.0).cpu() * tokens).round().long()

    # -- statistics --
    def tokens_per_expert(self) -> Dict[str, Tensor]:
        """``{layer: long [E]}`` assignments per expert."""
        return {name: v.clone() for name, v in self._assigned.items()}

    def per_layer(self) -> Dict[str, float]:
        """``{layer: mean experts per token}`` (nan for a layer that saw no token)."""
        return {name: int(self._assigned[name].sum()) / self.tokens[name] if self.tokens[name] else float("nan")
                for name in self.layers}

    @property
    def experts_per_token(self) -> float:
        """Mean routed experts per token over every layer, token and forward (nan if none)."""
        tokens = sum(self.tokens.values())
        return sum(int(v.sum()) for v in self._assigned.values()) / tokens if tokens else float("nan")

    @property
    def relative_compute(self) -> float:
        """:attr:`experts_per_token` / ``nominal_k`` (1 = the routed compute as trained; nan without it)."""
        return self.experts_per_token / self.nominal_k if self.nominal_k else float("nan")

    def experts_per_sample(self) -> Dict[str, Tensor]:
        """``{layer: float [S]}``: mean experts per token of every sample, forwards concatenated in order."""
        if not self.per_sample:
            raise ValueError("per-sample experts were not recorded (record_routing(..., per_sample=False))")
        return {name: torch.cat(v) if v else torch.zeros(0) for name, v in self._samples.items()}

    def mean_experts_per_sample(self) -> Tensor:
        """float ``[S]``: :meth:`experts_per_sample` averaged over the layers."""
        per_layer = list(self.experts_per_sample().values())
        return torch.stack(per_layer).mean(0) if per_layer else torch.zeros(0)

    def _label(self, label: str) -> Dict[str, Dict[str, Tensor]]:
        if label not in self.labels:
            raise ValueError(f"unknown label {label!r}; declared: {sorted(self.labels)}")
        return self._by_label[label]

    def by_label(self, label: str) -> Dict[str, Dict[str, Tensor]]:
        """``{layer: stats}`` broken down by ``label``: float ``counts [C, E]`` (assignments),
        ``fraction [C, E]`` (share of the label's tokens sent to each expert), ``tokens [C]``,
        ``experts_per_token [C]`` and ``dropped_fraction [C]`` (nan for a label never seen)."""
        out = {}
        for name, acc in self._label(label).items():
            tokens = acc["tokens"].float()
            denom, nan = tokens.clamp_min(1), torch.full_like(tokens, float("nan"))
            counts = acc["counts"].float()
            out[name] = {"counts": counts, "fraction": counts / denom[:, None], "tokens": tokens,
                         "experts_per_token": torch.where(tokens > 0, counts.sum(1) / denom, nan),
                         "dropped_fraction": torch.where(tokens > 0, acc["dropped"].float() / denom, nan)}
        return out

    def experts_per_token_by(self, label: str) -> Tensor:
        """float ``[C]``: mean experts per token of each label value over every layer (nan if unseen)."""
        parts = list(self._label(label).values())
        if not parts:
            return torch.full((self.labels[label].num_labels,), float("nan"))
        counts = sum(p["counts"].sum(1) for p in parts).float()
        tokens = sum(p["tokens"] for p in parts).float()
        return torch.where(tokens > 0, counts / tokens.clamp_min(1), torch.full_like(tokens, float("nan")))


@contextlib.contextmanager
def record_routing(model: nn.Module, labels: Optional[Mapping[str, Union[Label, int]]] = None, *,
                   per_sample: bool = True, nominal_k: Optional[float] = None) -> Iterator[RoutingRecord]:
    """Record the routing of every routed MoE layer over every forward run inside the block.

    Args:
        model: any model with MoE layers (:class:`~moe_lite.layers.MoELayer` with a router).
        labels: ``{name: Label}`` to break the routing down by; an int ``C`` stands for
            ``Label(C)``, whose values the caller gives before each forward with
            ``rec.set_labels({name: labels})`` (long ``[B]`` per sample, ``[L]`` per position,
            ``[B, L]`` or ``[N]`` per token). See :func:`timestep_label`, :func:`position_label`.
        per_sample: keep each sample's mean experts per token (:meth:`RoutingRecord.experts_per_sample`).
        nominal_k: the nominal experts per token, for :attr:`RoutingRecord.relative_compute`.

    Usage::

        with record_routing(model, labels={"class": 10}) as rec:
            for x, y in batches:
                rec.set_labels({"class": y})
                model(x)
        rec.experts_per_token, rec.per_layer(), rec.by_label("class")["blocks.3.mlp"]["fraction"]

    Forward hooks read each layer's ``routing`` after its forward; they are removed on exit (also
    on an exception). A layer that routes more than once per model forward counts every call.

    Raises:
        ValueError: the model has no routed MoE layer, or a label is not an int or a :class:`Label`.
    """
    layers = _routed_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no routed MoE layer to record")
    specs: Dict[str, Label] = {}
    for name, spec in (labels or {}).items():
        if isinstance(spec, int) and not isinstance(spec, bool):
            spec = Label(spec)
        if not isinstance(spec, Label):
            raise ValueError(f"label {name!r} must be an int (number of values) or a Label, got {type(spec).__name__}")
        specs[str(name)] = spec
    record = RoutingRecord(specs, per_sample=per_sample, nominal_k=nominal_k)

    def make_hook(name: str):
        def hook(layer: nn.Module, inputs: Any, output: Any) -> None:
            if layer.routing is not None:
                record.add(model, name, layer.routing)

        return hook

    handles = [layer.register_forward_hook(make_hook(name)) for name, layer in layers]
    handles.append(model.register_forward_hook(lambda module, inputs, output: record._clear_given()))
    try:
        yield record
    finally:
        for handle in handles:
            handle.remove()


# ---- thresholds that move after training ----------------------------------------------------------------
Kind = Union[Type[nn.Module], Tuple[Type[nn.Module], ...], None]


def threshold_modules(model: nn.Module, kind: Kind = None) -> List[Tuple[str, InferenceThreshold]]:
    """``[(name, module)]`` of the modules with a movable inference threshold, in model order.

    ``kind=None``: every :class:`~moe_lite.routers.InferenceThreshold` that is not inside another
    one (a LoRAExperts layer's threshold, not its TopP router's p, which the layer's threshold
    bypasses in eval); a class or tuple of classes: exactly the modules of that kind.

    Raises:
        ValueError: none found (the message names the model and the kind).
    """
    if kind is not None:
        found = [(n, m) for n, m in model.named_modules() if isinstance(m, kind) and isinstance(m, InferenceThreshold)]
    else:
        found = []
        for n, m in model.named_modules():
            if isinstance(m, InferenceThreshold) and not any(n.startswith(f"{outer}.") or outer == "" for outer, _ in found):
                found.append((n, m))
    if not found:
        what = f" of kind {_kind_name(kind)}" if kind is not None else ""
        raise ValueError(f"{type(model).__name__} has no MoE layer with a movable threshold{what} "
                         f"(TopP, Race, LoRAExperts: modules implementing routers.InferenceThreshold)")
    return found


def _kind_name(kind: Kind) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " / ".join(k.__name__ for k in kinds)


def inference_thresholds(model: nn.Module, kind: Kind = None) -> Dict[str, Optional[float]]:
    """``{module name: inference threshold}`` (a float, or None where none is set yet / in use)."""
    return {name: m.inference_threshold for name, m in threshold_modules(model, kind)}


Value = Union[float, None, Mapping[str, Optional[float]], Callable[[Optional[float]], Optional[float]]]


class inference_threshold:
    """Set the inference threshold of every module with a movable one, now; as a context manager,
    restore the previous state on exit (also on an exception).

    ``value``: one number for every module; a mapping ``{module name: value}`` (e.g. a snapshot
    from :func:`inference_thresholds` or :attr:`previous`) that must name every module; or a
    function ``old -> new`` (e.g. ``lambda t: t + 0.1``, a shift of each learned value). Each
    module validates its own value through ``set_inference_threshold`` (TopP: p in (0, 1]; Race:
    finite; LoRAExperts: [0, 1] or None). ``kind``: see :func:`threshold_modules`.

    Usage::

        inference_threshold(model, 0.3)                       # a setter
        with inference_threshold(model, 0.3) as previous:     # restored on exit
            evaluate(model)

    :attr:`previous` holds the thresholds from before. On a rejected value nothing stays changed.
    The state is restored exactly: each module's own buffers (the ``threshold``, Race's
    ``initialized``) are copied back.

    Raises:
        ValueError: no module with a movable threshold (naming the model), a mapping without a
            module, a function given a module with no threshold yet, or a value a module rejects.
    """

    def __init__(self, model: nn.Module, value: Value, *, kind: Kind = None) -> None:
        self.modules = threshold_modules(model, kind)
        self.previous: Dict[str, Optional[float]] = {name: m.inference_threshold for name, m in self.modules}
        # each module's own buffers: restoring them puts back exactly what was there (even "not set yet")
        self._saved = {name: {b: t.detach().clone() for b, t in m.named_buffers(recurse=False)}
                       for name, m in self.modules}
        try:
            for name, module in self.modules:
                module.set_inference_threshold(self._value_for(name, value))
        except Exception:
            self.restore()
            raise

    def _value_for(self, name: str, value: Value) -> Optional[float]:
        if isinstance(value, Mapping):
            if name not in value:
                raise ValueError(f"the thresholds given have no value for {name!r}; they must name "
                                 f"{[n for n, _ in self.modules]}")
            return value[name]
        if callable(value):
            old = self.previous[name]
            if old is None:
                raise ValueError(f"{name!r} has no inference threshold to shift yet (train it, or set one first)")
            return value(old)
        return value

    @torch.no_grad()
    def restore(self) -> None:
        """Put back every module's state from before."""
        for name, module in self.modules:
            buffers = dict(module.named_buffers(recurse=False))
            for b, saved in self._saved[name].items():
                buffers[b].copy_(saved)

    def __enter__(self) -> Dict[str, Optional[float]]:
        return self.previous

    def __exit__(self, *exc: Any) -> None:
        self.restore()
