"""Models built from moe_lite layers.

* :mod:`.vit`: ViT / ViMoE / dynamic top-p routing on 28x28 images.
* :mod:`.adapters`: sparse adaptation of a frozen ViT with LoRA experts.
* :mod:`.dit`: DiT / DiT-MoE / Race-DiT and the diffusion process (import it as ``moe_lite.models.dit``).
"""
# ---- vit.py -----------------------------------------------------------------------------------------
from .vit import (
    ViT,
    ViTConfig,
    count_parameters,
    dense_equivalent,
    dynamic_config,
    experts_per_sample,
    experts_per_token,
    patch_experts,
    top2_config,
    vimoe_config,
)

# ---- adapters.py ------------------------------------------------------------------------------------
from .adapters import (
    LoRAExperts,
    LoRALinear,
    adapt,
    adapter_cost,
    matched_lora_rank,
    split_classes,
)

__all__ = [
    "ViT",
    "ViTConfig",
    "count_parameters",
    "dense_equivalent",
    "dynamic_config",
    "experts_per_sample",
    "experts_per_token",
    "patch_experts",
    "top2_config",
    "vimoe_config",
    "LoRAExperts",
    "LoRALinear",
    "adapt",
    "adapter_cost",
    "matched_lora_rank",
    "split_classes",
]

# ---- dit.py (DiT / DiT-MoE): its exports go below this line ------------------------------------------
from .dit import DiT, DiTConfig  # noqa: E402

__all__ += ["DiT", "DiTConfig"]

# ---- lm.py (causal LM on the synthetic multi-task sequences) ------------------------------------------
from .lm import CausalLM, LMConfig, SequenceTask  # noqa: E402

__all__ += ["CausalLM", "LMConfig", "SequenceTask"]
