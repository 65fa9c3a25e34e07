"""Rank side of tests/plan/test_plan.py's FSDP check: ``torchrun --nproc_per_node N tests/plan/plan_fsdp_worker.py METHOD
OUT.json`` traces the planner's step on real tensors, sharded over the job's real gloo group, and rank 0 writes
what the tracker saw. The test compares it with the plan traced on fake tensors over a fake group."""

import json
import sys

import torch
import torch.distributed as dist

from slimtune.methods import make_config
from slimtune.plan.trace import trace_step
from tests.plan.test_plan import FSDP_SETTINGS, fsdp_config

torch.set_num_threads(1)
dist.init_process_group("gloo")
method, out = sys.argv[1], sys.argv[2]
t = trace_step(
    fsdp_config(), make_config(method, **FSDP_SETTINGS.get(method, {})), 2, 64, torch.float32,
    fake=False, fsdp=dist.get_world_size(),
)  # fmt: skip
if dist.get_rank() == 0:
    rec = {"peak": t.peak, "at_grads": t.at_grads, "frozen": t.frozen_bytes, "trainable": t.trainable_bytes}
    with open(out, "w") as fh:
        json.dump(rec, fh)
dist.destroy_process_group()
