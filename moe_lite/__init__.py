"""moe_lite: every Mixture-of-Experts router and regularizer, small models, and notebooks to see them work."""
from .routing import Routing, by_label, routing_summary

__version__ = "0.1.0"
__all__ = ["Routing", "by_label", "routing_summary", "__version__"]
