"""QST: quantized side tuning (Zhang et al., ACL 2024)."""

from slimtune.methods.qst.apply import QSTAdapted, apply_qst
from slimtune.methods.qst.config import QSTConfig

__all__ = ["QSTAdapted", "QSTConfig", "apply_qst"]
