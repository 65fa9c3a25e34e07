"""MEFT: memory-efficient fine-tuning through a host-resident sparse adapter (Hao et al., ACL 2024)."""

from slimtune.methods.meft.apply import MEFTAdapted, apply_meft
from slimtune.methods.meft.config import MEFTConfig

__all__ = ["MEFTAdapted", "MEFTConfig", "apply_meft"]
