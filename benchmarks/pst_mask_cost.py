"""What PST's masks cost: the score S = |W0 + βUV|·prior + α1·AB + α2·(R ⊕ C) and the keep-mask of every
targeted layer, against the training step and the decoding step they sit in, and against a full sort.

    .venv/bin/python benchmarks/pst_mask_cost.py [MODEL] [REPEATS]     # defaults: smollm2-135m 5

Every figure is the median of REPEATS timings in this one run, on the real model wrapped by ``apply_pst`` with the
shipped options (50%, wanda prior), the masks computed by the library's own functions:
- scores: S for all targeted layers (no grad);
- one mask per rule from those scores: ``local`` (one ``kthvalue`` per layer), ``row`` (per-row ``kthvalue``), 2:4,
  the gradual N:M ramp, and a full ``argsort`` of each layer's scores (what a sort-based top-k costs);
- a training micro-batch (forward + backward, batch 4 × 256) with the mask cached vs recomputed, as it is once per
  optimizer step;
- one greedy decoding step (one new token over a 256-token KV cache): with the masked weight cached (built once
  per parameter state when no gradient is needed), with only the mask cached (M ⊙ (W0 + βUV) rebuilt in every
  forward, S not), and with nothing cached (S, mask and M ⊙ W rebuilt).
"""

from __future__ import annotations

import statistics
import sys
import time

import torch

from slimtune.methods.pst import PSTConfig, apply_pst
from slimtune.methods.pst.apply import pst_layers, set_sparsity
from slimtune.methods.pst.layer import nm_mask, nm_topk_mask, row_topk_mask, topk_mask
from slimtune.models import loading as models


def median_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main(model_name: str = "smollm2-135m", repeats: int = 5) -> None:
    torch.manual_seed(0)
    model, _tok = models.load(model_name, "float32", device="cpu")
    cfg = PSTConfig(sparsity=0.5, score_prior="wanda", scope="row", init="kaiming")
    adapted = apply_pst(model, cfg)
    model = adapted.model
    layers = list(pst_layers(model).values())
    set_sparsity(model, 0.5, None)
    with torch.no_grad():  # a trained-looking state: non-zero V, B, R, C and an input scale
        for layer in layers:
            for p in (layer.pst_V, layer.pst_B, layer.pst_R, layer.pst_C):
                p.normal_(0, 1e-3)
            layer.pst_in_scale.uniform_(0.5, 1.5)
    n_weights = sum(layer.base_layer.weight.numel() for layer in layers)
    print(
        f"{model_name}: {len(layers)} PST layers, {n_weights:,} weights, torch threads {torch.get_num_threads()}"
    )

    def clear(weight: bool = True, mask: bool = True) -> None:
        for layer in layers:
            if weight:
                layer._weight_cache = None
            if mask:
                layer._cache = None

    with torch.no_grad():
        scores = [layer.scores(layer.effective_weight()) for layer in layers]

    def all_scores():
        with torch.no_grad():
            for layer in layers:
                layer.scores(layer.effective_weight())

    def argsort_masks():
        for s in scores:
            flat = s.flatten()
            keep = torch.ones_like(flat, dtype=torch.bool)
            keep[flat.argsort(stable=True)[: flat.numel() // 2]] = False

    rules = {
        "local (kthvalue per layer)": lambda: [topk_mask(s, 0.5) for s in scores],
        "row (kthvalue per row)": lambda: [row_topk_mask(s, 0.5) for s in scores],
        "2:4": lambda: [nm_mask(s, 2, 4) for s in scores],
        "2:4 gradual ramp at 40%": lambda: [nm_topk_mask(s, 0.4, 2, 4) for s in scores],
        "full argsort per layer": argsort_masks,
    }
    t_scores = median_time(all_scores, repeats)
    print(f"scores S, all layers: {t_scores * 1e3:8.1f} ms")
    for label, fn in rules.items():
        print(f"mask {label:27}: {median_time(fn, repeats) * 1e3:8.1f} ms")

    model.train()
    ids = torch.randint(0, model.config.vocab_size, (4, 256))

    def micro_batch(recompute: bool):
        def run():
            if recompute:
                clear()
            model(input_ids=ids, labels=ids).loss.backward()

        return run

    t_cached = median_time(micro_batch(False), repeats)
    t_fresh = median_time(micro_batch(True), repeats)
    print(
        f"training micro-batch 4 x 256 (forward + backward): mask cached {t_cached:.2f} s, "
        f"recomputed {t_fresh:.2f} s -> the refresh after each optimizer step is {(t_fresh - t_cached) / t_fresh:.1%} of a micro-batch"
    )
    model.zero_grad(set_to_none=True)

    model.eval()
    with torch.no_grad():
        out = model(input_ids=ids[:1], use_cache=True)
    cache, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
    seen = cache.get_seq_length()

    def decode(weight: bool, mask: bool):
        def run():
            clear(weight, mask)
            extra = cache.get_seq_length() - seen
            if extra:
                cache.crop(-extra)  # drop the token the previous timing appended
            with torch.no_grad():
                model(input_ids=nxt, past_key_values=cache, use_cache=True)

        return run

    d_weight = median_time(decode(False, False), repeats)
    d_mask = median_time(decode(True, False), repeats)
    d_none = median_time(decode(True, True), repeats)
    print(
        f"decoding step (1 token, 256 cached): masked weight cached {d_weight * 1e3:.1f} ms; mask cached, "
        f"M ⊙ (W0 + βUV) rebuilt {d_mask * 1e3:.1f} ms ({d_mask / d_weight:.1f}x); nothing cached "
        f"{d_none * 1e3:.1f} ms ({d_none / d_weight:.1f}x)"
    )


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "smollm2-135m", int(sys.argv[2]) if len(sys.argv) > 2 else 5)
