"""SAT: sparsity-accelerated training (Ma et al., Findings of ACL 2024)."""

from slimtune.methods.sat.apply import SATAdapted, SATController, apply_sat, remove_sat, sat_modules
from slimtune.methods.sat.config import SATConfig
from slimtune.methods.sat.schedule import OmissionSchedule

__all__ = [
    "OmissionSchedule",
    "SATAdapted",
    "SATConfig",
    "SATController",
    "apply_sat",
    "remove_sat",
    "sat_modules",
]
