"""MEFT: memory-efficient fine-tuning through a host-resident sparse adapter (Hao et al., ACL 2024)."""

from slimtune.methods.meft.apply import MEFTAdapted, MEFTLayer, apply_meft
from slimtune.methods.meft.config import MEFTConfig
from slimtune.methods.meft.select import Selection, select_topk, union_rows
from slimtune.methods.meft.store import LayerStore

__all__ = [
    "LayerStore",
    "MEFTAdapted",
    "MEFTConfig",
    "MEFTLayer",
    "Selection",
    "apply_meft",
    "select_topk",
    "union_rows",
]
