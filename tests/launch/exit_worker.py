"""Ranks that end with gloo work in flight: ``torchrun --nproc_per_node 2 tests/launch/exit_worker.py MODE``.

Written as training scripts usually are: a ``DistributedDataParallel`` model that lives until the script ends, the
last collectives started asynchronously on tensors Python created and dropped, ``destroy_process_group()``, and the
end of the script: ``MODE=teardown`` through the interpreter's usual teardown, ``MODE=end_worker_process`` as a
launched ``polytropon`` rank ends. DDP keeps the gloo process group and its threads alive past
``destroy_process_group``; with the usual teardown most such launches (13 of 18 here) abort in a rank (SIGABRT,
``terminate called without an active exception``, the message a rank of ``polytropon train`` once died with).
Run by ``tests/app/test_distributed.py``.
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist

from polytropon.app.cli import end_worker_process

N_COLLECTIVES = 32

mode = sys.argv[1]
dist.init_process_group("gloo")
model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(3, 3), init_sync=False)
for i in range(N_COLLECTIVES):
    dist.all_reduce(torch.ones(200_000 + 50_000 * i), async_op=True)
dist.destroy_process_group()
if mode == "end_worker_process":
    end_worker_process(0)
