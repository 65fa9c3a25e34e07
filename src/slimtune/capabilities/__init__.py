"""The capability matrix: the probe suite that measures every method on every family, dtype and trainer feature
(``probes``), and the renderer of the committed matrix (``capabilities.json`` -> docs/capabilities.md)."""
