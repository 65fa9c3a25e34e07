"""PST: parameter-efficient sparse training (Li et al., IJCAI 2022)."""

from slimtune.methods.pst.apply import (
    PSTAdapted,
    apply_pst,
    context_positions,
    cubic_sparsity,
    distillation_kl,
    pst_layers,
    set_sparsity,
    sparsity_report,
)
from slimtune.methods.pst.config import PSTConfig
from slimtune.methods.pst.layer import PSTLinear, n_pruned, nm_mask, topk_mask

__all__ = [
    "PSTAdapted",
    "PSTConfig",
    "PSTLinear",
    "apply_pst",
    "context_positions",
    "cubic_sparsity",
    "distillation_kl",
    "n_pruned",
    "nm_mask",
    "pst_layers",
    "set_sparsity",
    "sparsity_report",
    "topk_mask",
]
