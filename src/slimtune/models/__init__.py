"""Models: loading (HF directories, GGUF files, aliases, offline cache), tiny random models of every family for
tests, named architecture shapes, and GGUF export."""
