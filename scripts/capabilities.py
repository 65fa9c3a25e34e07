"""Probe every trainer method on every decoder family, dtype and trainer feature; write the capability matrix.

.venv/bin/python scripts/capabilities.py          # writes src/slimtune/capabilities/capabilities.json, docs/capabilities.md
.venv/bin/python scripts/capabilities.py --check  # exit 1 if either file differs from a fresh probe
"""

from __future__ import annotations

import json
import logging
import os
import sys
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "capabilities.md"


def main(argv: list[str]) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    from slimtune.capabilities.probes import probe_all
    from slimtune.capabilities.render import MATRIX_FILE, render

    matrix = probe_all()
    text_json = json.dumps(matrix, indent=1, ensure_ascii=False) + "\n"
    text_md = render(matrix)
    if "--check" in argv:
        stale = [
            str(p)
            for p, t in ((MATRIX_FILE, text_json), (DOC, text_md))
            if not p.is_file() or p.read_text() != t
        ]
        print("stale: " + ", ".join(stale) if stale else "capability matrix up to date")
        return 1 if stale else 0
    MATRIX_FILE.write_text(text_json, encoding="utf-8")
    DOC.write_text(text_md, encoding="utf-8")
    print(f"wrote {MATRIX_FILE.relative_to(ROOT)} and {DOC.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
