"""moe_lite: every Mixture-of-Experts router and regularizer, small models, and notebooks to see them work.

``import moe_lite`` makes every public module an attribute: the core (routing, experts, layers,
routers, losses) is imported here, the rest on first access (see ``__getattr__``), so
``import moe_lite`` costs little more than torch and never pulls in plotly or ipywidgets.
"""
from importlib import import_module as _import_module, util as _import_util
from typing import Any as _Any

from . import experts, layers, losses, routers, routing  # noqa: F401  (public modules)
from .routing import NonFiniteError, Routing, by_label, routing_summary
from .experts import Experts, x_in_y
from .layers import (
    FFN,
    LinearGate,
    MLPGate,
    MoE,
    MoELayer,
    SoftMoE,
    aux_loss,
    aux_losses,
    moe_layers,
    routing_stats,
    target_predictions,
    update_biases,
)

__version__ = "0.1.0"
__all__ = ["NonFiniteError", "Routing", "by_label", "routing_summary", "__version__"]
__all__ += ["Experts", "x_in_y", "FFN", "LinearGate", "MLPGate", "MoE", "MoELayer", "SoftMoE"]
__all__ += ["aux_loss", "aux_losses", "moe_layers", "routing_stats", "target_predictions", "update_biases"]


def __getattr__(name: str) -> _Any:
    """Every other public module (data, train, metrics, models, bench, viz, widgets, notebook,
    experiments, ...) is imported on first access: viz, widgets, notebook and experiments import
    plotly / ipywidgets, which ``import moe_lite`` must not. They are not listed by ``dir()`` until
    imported, so pydoc and ``inspect.getmembers`` do not import them either."""
    if not name.startswith("_") and _import_util.find_spec(f"{__name__}.{name}") is not None:
        return _import_module(f"{__name__}.{name}")  # also sets it as an attribute
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
