"""The ray executor on a real Ray head (loopback, tests/ray_head.py): the same bytes, record and scores as the
local executor; a worker killed mid-step is retried by Ray to the same bytes; an unreachable head is an error at
once (exit 78), from the CLI and at the daemon's start; the daemon's merge child uses the executor it is given."""

from __future__ import annotations

import hashlib
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cli_runner import run_cli
from daemon_harness import DaemonProcess, wait_for
from engine_checks import leftovers
from mlflow_server import free_port
from nufilt_daemon.config import Settings
from nufilt_daemon.intake import Arrival
from nufilt_daemon.states import JobState
from ray_head import LOOPBACK_ENV, RayHead
from worker_harness import make_worker, run_until

from nufilt_core.errors import ClusterError, LineageError, NufiltError
from nufilt_core.merge import MergeRequest, MergeResult, ScoreRequest, merge_step


@pytest.fixture(scope="module")
def ray_head() -> Iterator[RayHead]:
    with pytest.MonkeyPatch.context() as env, RayHead(cpus=2) as head:
        for key, value in LOOPBACK_ENV.items():  # the drivers: this process and the daemon's merge child
            env.setenv(key, value)
        yield head


def weights_hash(folder: Path) -> str:
    return hashlib.sha256(b"".join(p.read_bytes() for p in sorted(folder.glob("*.safetensors")))).hexdigest()


def step(tiny: dict[str, Path], out: Path, arrival: str, previous: Path | None, options: dict,
         **where: object) -> MergeResult:
    return merge_step(MergeRequest(base=tiny["base"], checkpoint=tiny[arrival], output=out, previous=previous,
                                   options=options, check_first=False, scores=ScoreRequest(), **where))


def test_ray_tasks_write_the_bytes_the_local_executor_writes(ray_head: RayHead, tiny: dict[str, Path],
                                                              tmp_path: Path):
    """Two steps of plus-iso (its per-matrix trust-radius state goes into the record), with the scores."""
    got = {}
    for where in ({"workers": 2}, {"executor": "ray", "ray_address": ray_head.address}):
        name = str(where.get("executor", "local"))
        first = step(tiny, tmp_path / f"{name}1", "t1", None, {"iters": 5}, **where)
        second = step(tiny, tmp_path / f"{name}2", "t2", tmp_path / f"{name}1", {}, **where)
        got[name] = [(weights_hash(r.output), r.record.summary, r.record.method_state, r.scores)
                     for r in (first, second)]
    assert got["ray"] == got["local"]
    assert got["ray"][1][2]["rescale"] and got["ray"][1][1]["filtered_tensors"] > 1  # several tasks, their state


def test_a_worker_killed_mid_step_is_retried_and_writes_the_same_bytes(ray_head: RayHead, tiny: dict[str, Path],
                                                                        tmp_path: Path):
    options = {"profile": "paper", "iters": 2000}  # long enough per matrix to be caught running
    step(tiny, tmp_path / "m1", "t1", None, options, workers=2)
    local = step(tiny, tmp_path / "local", "t2", tmp_path / "m1", {}, workers=2)

    result: list[MergeResult | BaseException] = []

    def run() -> None:
        try:
            result.append(step(tiny, tmp_path / "ray", "t2", tmp_path / "m1", {}, executor="ray",
                               ray_address=ray_head.address))
        except BaseException as e:  # reported below
            result.append(e)

    merging = threading.Thread(target=run)
    merging.start()
    victim = wait_for("a Ray worker merging a matrix", lambda: ray_head.running_tasks("merge_matrix_task"),
                      timeout=120, interval=0.01)[0]
    os.kill(victim, signal.SIGKILL)  # a worker process lost mid-task, as a node's OOM killer would do it
    merging.join(timeout=300)
    assert not merging.is_alive() and not isinstance(result[0], BaseException), result
    assert victim not in ray_head.processes()  # it really died; Ray ran its task again elsewhere
    assert weights_hash(tmp_path / "ray") == weights_hash(local.output)
    assert result[0].record.summary == local.record.summary


def test_a_method_s_error_in_a_task_is_the_error_the_local_executor_raises(ray_head: RayHead,
                                                                           tiny: dict[str, Path], tmp_path: Path):
    """A step that filters a matrix its lineage never rescaled: the trust radius refuses it inside the task."""
    step(tiny, tmp_path / "m1", "t1", None, {"iters": 2, "include": ["query"], "preset": "auto"}, workers=2)
    errors = []
    for where in ({"workers": 2}, {"executor": "ray", "ray_address": ray_head.address}):
        with pytest.raises(LineageError) as refused:
            step(tiny, tmp_path / "m2", "t2", tmp_path / "m1", {"include": ["query", "key"]}, **where)
        errors.append(str(refused.value))
        assert not (tmp_path / "m2").exists()
    assert errors[0] == errors[1] and "no rescale state for this matrix" in errors[0]
    assert leftovers(tmp_path) == []


def test_an_unreachable_head_fails_at_once_with_exit_78(tiny: dict[str, Path], tmp_path: Path):
    address = f"127.0.0.1:{free_port()}"  # nothing listens there
    t0 = time.monotonic()
    proc = run_cli("merge", "--base", tiny["base"], "--checkpoint", tiny["t1"], "--output", tmp_path / "m1",
                   "--executor", "ray", "--ray-address", address, check=False)
    assert proc.returncode == 78, proc.stderr
    assert f"cannot reach the Ray cluster at {address}" in proc.stderr and "Traceback" not in proc.stderr
    assert time.monotonic() - t0 < 60  # not Ray's minutes of retrying
    assert not (tmp_path / "m1").exists() and leftovers(tmp_path) == []

    daemon = DaemonProcess(tmp_path / "svc", tiny["base"], executor="ray", ray_address=address)
    for command in (["daemon", "--check"], ["daemon"]):  # validating the settings, and starting
        proc = daemon.cli(*command, check=False)
        assert proc.returncode == 78, proc.stderr  # EX_CONFIG: systemd does not restart it
        assert f"cannot reach the Ray cluster at {address}" in proc.stderr and "Traceback" not in proc.stderr
    assert not (daemon.state / "journal.db").exists()  # refused before anything started


def test_the_daemon_s_merge_child_uses_the_ray_executor(ray_head: RayHead, tiny: dict[str, Path], tmp_path: Path):
    worker, intake, journal, store = make_worker(tmp_path / "ray", tiny["base"], executor="ray",
                                                 ray_address=ray_head.address)
    intake.emit(Arrival(tiny["t1"], "folder", "t1"))
    run_until(worker, "the merge promoted", lambda: journal.job(1).state == JobState.PROMOTED)
    local = merge_step(MergeRequest(base=tiny["base"], checkpoint=tiny["t1"], output=tmp_path / "local",
                                    options={"iters": 2}))
    assert weights_hash(store.production().path) == weights_hash(local.output)


def test_only_a_parallel_safe_method_runs_on_ray(tiny: dict[str, Path], tmp_path: Path):
    """OPCM merges its matrices in order: refused with the reason, by the daemon's settings and by a merge step
    (before any tensor is read)."""
    with pytest.raises(ValueError, match=r"executor ray merges with a parallel-safe method \(nufilt\), not opcm"):
        Settings(base_model=tiny["base"], method="opcm", executor="ray", ray_address="127.0.0.1:1")
    with pytest.raises(NufiltError, match=r"the ray executor merges with a parallel-safe method \(nufilt\); opcm"):
        merge_step(MergeRequest(base=tiny["base"], checkpoint=tiny["t1"], output=tmp_path / "m1", method="opcm",
                                executor="ray", ray_address=f"127.0.0.1:{free_port()}"))
    assert not (tmp_path / "m1").exists()


def test_gpu_tasks_need_gpus_in_the_cluster_and_cuda_in_its_workers(ray_head: RayHead, tiny: dict[str, Path],
                                                                  tmp_path: Path):
    """--device cuda with ray: a GPU per task. A cluster without GPUs is refused before any task; a worker given a GPU
    whose torch cannot use CUDA (here: a head that declares a GPU this host lacks) fails the step naming that. The
    driver needs no GPU; nothing is written either way."""
    request = {"base": tiny["base"], "checkpoint": tiny["t1"], "executor": "ray", "device": "cuda",
               "options": {"iters": 2}}
    with pytest.raises(ClusterError, match=f"the Ray cluster at {ray_head.address} has no GPUs") as no_gpus:
        merge_step(MergeRequest(output=tmp_path / "m1", ray_address=ray_head.address, **request))
    assert no_gpus.value.exit_code == 78
    with RayHead(cpus=1, gpus=1) as gpu_head:
        with pytest.raises(ClusterError, match=r"was given a GPU, but its torch .* cannot use CUDA"):
            merge_step(MergeRequest(output=tmp_path / "m2", ray_address=gpu_head.address, **request))
    with pytest.raises(NufiltError, match="with the ray executor use cpu or cuda"):
        merge_step(MergeRequest(output=tmp_path / "m3", ray_address=ray_head.address,
                                **{**request, "device": "cuda:1"}))
    assert not any((tmp_path / f"m{i}").exists() for i in (1, 2, 3)) and leftovers(tmp_path) == []
