#!/usr/bin/env bash
# TCMalloc for the `slimtune` command (src/slimtune/core/hostmem.py): on CPU it keeps a step's peak RSS near its tensors
# at no speed cost (docs/memory.md). Optional and best effort: installed from Debian/Ubuntu's package where this runs
# as root with apt-get; otherwise one line says how. Never fails the set-up.
set -u
if ldconfig -p 2>/dev/null | grep -q "libtcmalloc_minimal.so.4\|libtcmalloc.so.4\|libjemalloc.so.2"; then
  exit 0
fi
if [ "$(uname -s)" = Linux ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "installing TCMalloc (apt-get install libtcmalloc-minimal4) for a lower CPU peak: docs/memory.md"
  if (apt-get install -y -q libtcmalloc-minimal4 >/dev/null 2>&1 ||
      { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q libtcmalloc-minimal4 >/dev/null 2>&1; }); then
    exit 0
  fi
  echo "TCMalloc not installed (apt-get failed); slimtune runs on the system's malloc"
  exit 0
fi
if [ "$(uname -s)" = Linux ]; then
  echo "optional: 'apt install libtcmalloc-minimal4' (or your distribution's gperftools) lowers slimtune's CPU peak memory (docs/memory.md)"
fi
exit 0
