"""SAT: sparsity-accelerated training (Ma et al., Findings of ACL 2024)."""

from slimtune.methods.sat.apply import SATAdapted, apply_sat
from slimtune.methods.sat.config import SATConfig

__all__ = ["SATAdapted", "SATConfig", "apply_sat"]
