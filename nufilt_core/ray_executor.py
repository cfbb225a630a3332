"""Matrices merged as Ray tasks: past one host, and past one process's interpreter lock on one.

The driver (the merge step) still reads, hashes, checks and writes every tensor, in order, as with the local
executor. Each matrix a parallel-safe method merges becomes one Ray task: it gets the method (put in the object
store once per step) and the matrix's inputs (through the object store), merges on one thread, and returns the
merged tensor with what the method recorded about that matrix, which the driver hands back to its own method
object (`MergeMethod.tensor_state` / `keep_tensor_state`). The output's bytes are those of the local executor on
CPUs of the same kind (one thread's arithmetic either way). A worker lost mid-task is retried by Ray; a method's
own error is not retried and reaches the caller as that error.

GPUs: with device `cuda` each task asks Ray for one GPU (`num_gpus=1`; Ray makes it the task's only visible
device), merges there and returns its results on the CPU; the driver needs no GPU. A cluster without GPUs is
refused at the start, a worker whose torch has no CUDA at its first task (`ClusterError`, exit 78). GPU and CPU
arithmetic differ in rounding, so such a step's bytes are not the CPU's (the engine's CUDA parity: 1e-4).

Addresses: HOST:PORT of a running cluster's head (`ray start --head`), `ray://HOST:PORT` for Ray Client, or
none: the RAY_ADDRESS environment variable, else a Ray instance started for this step on this host, bound to
loopback. A head that cannot be reached is an error at once (`ClusterError`, exit 78), never a wait.
"""

from __future__ import annotations

import importlib.util
import ipaddress
import os
import socket
from collections.abc import Callable
from types import ModuleType
from typing import Any
from urllib.parse import urlsplit

import torch

from .devices import CPU, torch_threads
from .errors import ClusterError, NufiltError
from .linalg import one_blas_thread
from .methods.base import LowRank, MergeMethod

CONNECT_TIMEOUT_SECONDS = 5.0
NOT_INSTALLED = "the ray executor needs Ray: pip install 'nufilt[ray]'"
TASK_RETRIES = 3  # a worker process or node lost mid-task


def split_address(address: str) -> tuple[str, int]:
    """(host, port) of HOST:PORT or ray://HOST:PORT; a ClusterError for anything else."""
    parts = urlsplit(address if "://" in address else f"//{address}")
    if parts.scheme not in ("", "ray") or not parts.hostname:
        raise ClusterError(f"ray_address {address!r}: expected HOST:PORT or ray://HOST:PORT")
    try:
        port = parts.port
    except ValueError:
        port = None
    if port is None:
        raise ClusterError(f"ray_address {address!r}: no port (the head's GCS port, 6379 unless `ray start --head "
                           "--port` chose another; Ray Client's 10001)")
    return parts.hostname, port


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_ray(address: str | None) -> None:
    """Raise ClusterError when Ray is not installed, or the head at `address` does not accept a connection within a
    few seconds (Ray itself would retry for minutes). None (a local instance started on demand) is always reachable.
    Ray is not imported."""
    if importlib.util.find_spec("ray") is None:
        raise ClusterError(NOT_INSTALLED)
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address is None or address == "auto":
        return
    host, port = split_address(address)
    try:
        with socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_SECONDS):
            pass
    except OSError as e:
        raise ClusterError(f"cannot reach the Ray cluster at {address}: {e.strerror or e} (start its head with "
                           "`ray start --head`, or set ray_address / --ray-address to the head's HOST:PORT)") from None


def import_ray(address: str | None) -> ModuleType:
    """Ray, with the settings this address needs, or a ClusterError naming the extra to install."""
    host = split_address(address)[0] if address and address != "auto" else "127.0.0.1"
    if is_loopback(host):
        # a loopback address means a head bound to loopback (one host); without this Ray replaces such an
        # address with the host's own, which that head does not answer. Read when ray is first imported
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    try:
        import ray
    except ImportError:
        raise ClusterError(NOT_INSTALLED) from None
    return ray


def on_device(value: Any, device: torch.device) -> Any:
    """`value` with every tensor in it (nested in tuples, lists and dicts) moved to `device`."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, tuple | list):
        return type(value)(on_device(v, device) for v in value)
    if isinstance(value, dict):
        return {k: on_device(v, device) for k, v in value.items()}
    return value


def merge_matrix_task(method: MergeMethod, name: str, loaded: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
                      factors: LowRank | None, device: str = "cpu") -> tuple[torch.Tensor, Any]:
    """One matrix's merge in a Ray worker, on one torch and one BLAS thread as the local executor's workers, or on
    the GPU Ray gave the task; the results come back on the CPU."""
    where = torch.device(device)
    if where.type == "cuda" and not torch.cuda.is_available():
        raise ClusterError(f"the Ray worker on {socket.gethostname()} was given a GPU, but its torch "
                           f"({torch.__version__}) cannot use CUDA; install a CUDA build of torch there, or merge "
                           "with --device cpu")
    with torch_threads(1), one_blas_thread():
        base, previous, new = on_device(loaded, where)
        merged = method.merge_tensor(name, base, previous, new, on_device(factors, where))
    return merged.cpu(), on_device(method.tensor_state(name), CPU)


class RayPool:
    """The step's connection to Ray: `submit` starts one matrix's task and returns the call that waits for it."""

    def __init__(self, address: str | None, method: MergeMethod, device: torch.device = CPU):
        check_ray(address)
        self.device = device
        self.resource = "GPU" if device.type == "cuda" else "CPU"  # what a task takes one of
        self.ray = import_ray(address)
        self.started = not self.ray.is_initialized()
        if self.started:
            options: dict[str, Any] = {"logging_level": "ERROR", "log_to_driver": False,
                                       "configure_logging": False}
            if address is None and not os.environ.get("RAY_ADDRESS"):
                options.update(include_dashboard=False, _node_ip_address="127.0.0.1")
            try:
                self.ray.init(address=address, **options)
            except Exception as e:  # Ray's own kinds (connection, authentication, version): a configuration error
                raise ClusterError(f"cannot join the Ray cluster at {address or 'RAY_ADDRESS/local'}: {e}") from None
        self.method = method
        self.pending: set[Any] = set()
        try:
            if self.resource == "GPU" and self.ray.cluster_resources().get("GPU", 0) < 1:
                raise ClusterError(f"the Ray cluster at {address or 'RAY_ADDRESS/local'} has no GPUs (resources: "
                                   f"{self.ray.cluster_resources()}); merge with --device cpu, or add nodes with "
                                   "GPUs (`ray start --num-gpus N`)")
            self.method_ref = self.ray.put(method)
            self.task = self.ray.remote(num_cpus=1, num_gpus=1 if self.resource == "GPU" else 0,
                                        max_retries=TASK_RETRIES, retry_exceptions=False)(merge_matrix_task)
        except BaseException:
            self.close()  # never left connected: an error leaving a process joined to Ray hangs in Ray's excepthook
            raise

    @property
    def slots(self) -> int:
        """Tasks worth having in flight: the cluster's CPUs, or GPUs."""
        return max(1, int(self.ray.cluster_resources().get(self.resource, 1)))

    def submit(self, name: str, loaded: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
               factors: LowRank | None) -> Callable[[], torch.Tensor]:
        ref = self.task.remote(self.method_ref, name, loaded, factors, self.device.type)
        self.pending.add(ref)

        def result() -> torch.Tensor:
            try:
                merged, state = self.ray.get(ref)
            except self.ray.exceptions.RayTaskError as e:
                if isinstance(e.cause, NufiltError):  # the method's own error, as the local executor raises it
                    raise e.cause from None
                raise
            finally:
                self.pending.discard(ref)
            self.method.keep_tensor_state(name, state)
            return merged

        return result

    def close(self) -> None:
        """Cancel what is still running (a failed or stopped step), and leave a cluster this step joined."""
        for ref in self.pending:
            self.ray.cancel(ref, force=True)
        self.pending.clear()
        if self.started:
            self.ray.shutdown()
