"""moe_lite: every Mixture-of-Experts router and regularizer, small models, and notebooks to see them work."""
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
