"""PST: parameter-efficient sparse training (Li et al., IJCAI 2022)."""

from slimtune.methods.pst.apply import PSTAdapted, apply_pst
from slimtune.methods.pst.config import PSTConfig

__all__ = ["PSTAdapted", "PSTConfig", "apply_pst"]
