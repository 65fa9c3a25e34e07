"""The bottom layer, importing nothing else of slimtune: user errors, the config-schema machinery, files written
atomically and read with one clear error, memory accounting (bytes by role, peaks) and the host allocator."""
