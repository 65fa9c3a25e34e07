import torch

from slimtune.core import memory
from slimtune.methods import apply, make_config
from slimtune.models.loading import tiny_llama


def test_roles_add_up_for_full_fine_tuning():
    a = apply(tiny_llama(), make_config("full"))
    n = sum(p.numel() for p in a.trainable_parameters())
    opt = torch.optim.AdamW(a.trainable_parameters())
    ids = torch.randint(3, 256, (2, 8))
    a.model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    roles = a.memory_report()
    assert roles["trainable"] == 4 * n and roles["gradients"] == 4 * n and roles["frozen_weights"] == 0
    assert memory.optimizer_bytes(opt) == 8 * n + 4 * len(
        a.trainable_parameters()
    )  # two moments + step counters


def test_quantized_weights_count_as_frozen_weights():
    a = apply(tiny_llama(), make_config("qlora", r=4, backend="torch"))
    by = memory.tensor_bytes(a.model)
    assert by[("cpu", "uint8", "frozen_weights")] > 0
    assert a.memory_report()["trainable"] == 4 * sum(p.numel() for p in a.trainable_parameters())


def test_traffic_counter_is_part_of_the_contract():
    a = apply(tiny_llama(), make_config("lora", r=4))
    a.traffic.add("h2d", "layer0", 1024)
    a.traffic.add("h2d", "layer0", 1024)
    a.traffic.add("d2h", "layer1", 512)
    assert a.traffic.totals() == {"h2d": 2048, "d2h": 512}
    assert memory.peak_rss_bytes() > 0


def test_runtime_rss_is_the_current_footprint_below_the_peak():
    """In a fresh interpreter: what the test suite's process did before (models loaded and freed, heap kept by
    glibc) can serve a new 64 MiB tensor without any new resident page, which is no fault of the measurement."""
    import subprocess
    import sys

    code = """
import torch
from slimtune.core import memory
runtime = memory.runtime_rss_bytes()
slack = 4 * 1024 * 1024  # getrusage's peak trails /proc's current RSS by a few pages
assert 50e6 < runtime <= memory.peak_rss_bytes() + slack, runtime
big = torch.ones(64 * 1024 * 1024 // 4)  # 64 MiB, touched
grown = memory.current_rss_bytes() - runtime
assert grown >= 60 * 1024 * 1024, grown
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
