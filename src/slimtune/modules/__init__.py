"""What slimtune knows of a decoder and changes in it for every method: architecture accessors, the activations
kept for backward, regional compilation, the losses, and 4-bit (NF4) weights (``quant/``)."""
