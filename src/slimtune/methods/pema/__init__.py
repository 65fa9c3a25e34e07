"""PEMA: plug-in external memory adaptation for offsite tuning (Kim et al., NAACL 2024).

A workflow, not a trainer method: `slimtune pema build-memory | train | generate` (:mod:`slimtune.recipes.pema`).
"""

from slimtune.methods.pema.config import PEMAConfig

__all__ = ["PEMAConfig"]
