"""Data: user files and formats, tokenization, prompt masking, packing and batching (``records``), and the
built-in tasks shipped offline with their metrics (``tasks``)."""
