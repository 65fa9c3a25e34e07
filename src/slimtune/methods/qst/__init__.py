"""QST: quantized side tuning (Zhang et al., ACL 2024)."""

from slimtune.methods.qst.apply import QSTAdapted, apply_qst
from slimtune.methods.qst.config import QSTConfig
from slimtune.methods.qst.side_net import QSTModel, SideNetwork

__all__ = ["QSTAdapted", "QSTConfig", "QSTModel", "SideNetwork", "apply_qst"]
