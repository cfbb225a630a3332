"""How Ray workers get a matrix's inputs: through the object store, or read from a path every node shares?

For every 2-D tensor of a ViT-B/32-shaped step (base, previous merged model, new checkpoint), side by side in one
run on a Ray head this script starts on loopback (one CPU per core, workers started before timing):

  object store  the driver reads the three tensors (as the engine does: each byte read once, where it is hashed
                and checked) and passes them as task arguments
  shared path   the task gets the three files' paths and the tensor's name and reads the tensors itself

Each task returns a tensor of the matrix's size, as a merge does; at most one task per CPU is in flight, as in
the engine. Reported: the wall time of all matrices (median of --repeats, interleaved) and shared / object.

    .venv/bin/python bench/speed/ray_transfer.py --shape vit-b-32 --repeats 5
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections import deque
from pathlib import Path

import torch
from make_models import ensure_models

from nufilt_core.checkpoint import Checkpoint
from nufilt_core.ray_executor import import_ray
from nufilt_core.safetensors_io import read_tensor

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))  # the tests' loopback Ray head
from ray_head import LOOPBACK_ENV, RayHead


def from_arguments(base: torch.Tensor, previous: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    return base + (new - previous)


def from_paths(files: list[str], name: str) -> torch.Tensor:
    from safetensors import safe_open  # imported in the worker: Ray sends this script's functions by value

    base, previous, new = (safe_open(f, "pt").get_tensor(name) for f in files)
    return base + (new - previous)


def run(ray, task, jobs: list, slots: int) -> float:  # type: ignore[no-untyped-def]
    """Wall seconds for every job, at most `slots` in flight, results fetched in order (as the engine writes)."""
    t0 = time.perf_counter()
    pending: deque = deque()
    for job in jobs:
        pending.append(task.remote(*job()))
        while len(pending) > slots:
            ray.get(pending.popleft())
    while pending:
        ray.get(pending.popleft())
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="vit-b-32")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    models = ensure_models(args.shape, 2, 0)
    inputs = [Checkpoint.open(models[k]) for k in ("base", "ft-1", "ft-2")]
    names = [n for n, i in inputs[0].tensors.items() if len(i.shape) == 2]
    cpus = os.cpu_count() or 1
    os.environ.update(LOOPBACK_ENV)
    with RayHead(cpus=cpus, object_store_bytes=4 * 1024**3) as head:
        ray = import_ray(head.address)
        ray.init(address=head.address, logging_level="ERROR", log_to_driver=False)
        by_argument, by_path = ray.remote(num_cpus=1)(from_arguments), ray.remote(num_cpus=1)(from_paths)
        ray.get([by_argument.remote(*(torch.zeros(1),) * 3) for _ in range(cpus)])  # workers up, torch imported
        files = {n: [str(c.tensors[n].file) for c in inputs] for n in names}

        def object_job(name: str):  # type: ignore[no-untyped-def]
            return lambda: tuple(read_tensor(c.tensors[name]) for c in inputs)

        def path_job(name: str):  # type: ignore[no-untyped-def]
            return lambda: (files[name], name)

        times: dict[str, list[float]] = {"object store": [], "shared path": []}
        load = os.getloadavg()[0]
        for _ in range(args.repeats):
            times["object store"].append(run(ray, by_argument, [object_job(n) for n in names], cpus))
            times["shared path"].append(run(ray, by_path, [path_job(n) for n in names], cpus))
        size = sum(inputs[0].tensors[n].nbytes for n in names) * 3 / 1024**2
        print(f"{args.shape}: {len(names)} matrices, {size:.0f} MiB of inputs, {cpus} CPUs, "
              f"load average before: {load:.2f}")
        for k, v in times.items():
            print(f"  {k:<13} {statistics.median(v):6.2f} s (runs {', '.join(f'{x:.2f}' for x in v)})")
        ratio = statistics.median(times["shared path"]) / statistics.median(times["object store"])
        print(f"  shared path / object store: {ratio:.2f}x", flush=True)
        ray.shutdown()  # before the head goes
    return 0


if __name__ == "__main__":
    sys.exit(main())
