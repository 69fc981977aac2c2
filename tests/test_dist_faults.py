"""Failure semantics of multi-process runs (data parallel and pipeline), launched as srun launches them: one plain
process per rank and no agent to end the others. When one process fails (an exception, SIGKILL, a DataLoader
worker's death, during a step or a checkpoint save), every process ends within the stated bound, the failing one
shows its own error, the last checkpoint is a good one, and resuming finishes the run like an uninterrupted one.
A process that stops answering without dying fails its peers after ``train.dist_timeout_s``.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from blockssl.checkpoint import load_checkpoint
from blockssl.config import resume_config
from blockssl.train import pretrain
from tests.conftest import DDP_RUN, TINY, assert_same_model, assert_same_tensors, tiny_config

ROOT = Path(__file__).resolve().parents[1]
# 64 images / 16 per batch = 4 steps per epoch, 2 epochs, a checkpoint after every step. A collective waits at most
# 120 s (train.dist_timeout_s), far beyond BOUND: a run that ends within BOUND noticed the failure, not a timeout.
RUN = ["train.epochs=2", "train.checkpoint_every=1", "train.dist_timeout_s=120"]
PIPELINE = [*RUN, "noise.type=global", "train.execution=pipeline", "train.stages=1+2,3+4"]
DATA_PARALLEL = [*RUN, *DDP_RUN[:2]]  # synchronised BatchNorm, no noise: 2 processes train like one
AT = 5  # the step at which the fault is injected
BOUND = 30.0  # seconds from the failing process's end to the end of every other process


def _launch(out: Path, overrides: list[str], fault: str, rank: int, world: int = 2) -> list[subprocess.Popen]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for r in range(world):
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "RANK": str(r), "LOCAL_RANK": str(r),
               "WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "FAULT_RANK": str(rank)}
        env["PYTHONPATH"] += os.pathsep + str(ROOT / "src")
        procs.append(subprocess.Popen(
            [sys.executable, str(ROOT / "tests/fault_process.py"), fault, str(AT), "pretrain", *TINY, *overrides,
             f"out={out}"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
    return procs


def _ends(procs: list[subprocess.Popen], failing: int) -> list[str]:
    """Every process's stderr, after checking that each ended with a failure, the others within BOUND of the
    failing one (which must end within 120 s of the launch)."""
    try:
        procs[failing].wait(timeout=120)
        deadline = time.monotonic() + BOUND
        for p in procs:
            p.wait(timeout=max(deadline - time.monotonic(), 0.1))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    errors = [p.stderr.read() if p.stderr else "" for p in procs]
    assert all(p.returncode != 0 for p in procs), errors
    return errors


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    """The run every resumed pipeline must equal: one process, lean (what a pipeline computes)."""
    return pretrain(tiny_config(tmp_path_factory.mktemp("full") / "run", *PIPELINE, "train.execution=lean"))


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> Path:
    """The run every resumed data-parallel one must equal: one process with the global batch."""
    return pretrain(tiny_config(tmp_path_factory.mktemp("one") / "run", *DATA_PARALLEL))


def _good_checkpoint(out: Path) -> int:
    step = load_checkpoint(out / "checkpoints/last.pt")["step"]
    assert 1 <= step <= AT
    return step


@pytest.mark.parametrize(("fault", "rank", "message"), [
    ("worker", 0, "DataLoader worker"),  # stage 0 loses a loader worker (it hung before)
    ("raise", 1, "injected fault at step 5"),  # the last stage raises while the first sends to it
    ("kill", 1, ""),  # the last stage is killed: stage 0 blocks in a send, then notices
    ("save", 1, ""),  # the last stage dies while sending its part of a checkpoint to rank 0
])
def test_a_pipeline_stage_failing_ends_the_run_and_resumes_exactly(tmp_path, uninterrupted, fault, rank, message):
    out = tmp_path / "run"
    workers = ["data.num_workers=2"] if fault == "worker" else []
    errors = _ends(_launch(out, [*PIPELINE, *workers], fault, rank), rank)
    assert message in errors[rank]
    _good_checkpoint(out)
    pretrain(resume_config(out, ["train.execution=lean"]), resume=True)  # one process finishes it
    assert_same_tensors(load_checkpoint(out / "checkpoints/last.pt")["model"],
                        load_checkpoint(uninterrupted / "checkpoints/last.pt")["model"])


@pytest.mark.parametrize(("fault", "rank"), [("raise", 1), ("worker", 0), ("save", 0)])
def test_a_data_parallel_process_failing_ends_the_run_and_resumes(tmp_path, one_process, fault, rank):
    out = tmp_path / "run"
    workers = ["data.num_workers=2"] if fault == "worker" else []
    _ends(_launch(out, [*DATA_PARALLEL, *workers], fault, rank), rank)
    _good_checkpoint(out)
    pretrain(resume_config(out), resume=True)  # one process with the global batch finishes it
    assert_same_model(out, one_process)


def test_a_process_that_stops_answering_fails_the_others_after_the_timeout(tmp_path):
    """SIGSTOP: alive, holding its connections, never answering. Its peer gives up after train.dist_timeout_s (a
    launcher such as torchrun, or srun --kill-on-bad-exit, then ends the stopped one)."""
    procs = _launch(tmp_path / "run", [*PIPELINE, "train.dist_timeout_s=5"], "none", 1)
    try:
        while not (tmp_path / "run/checkpoints/last.pt").is_file() and procs[0].poll() is None:
            time.sleep(0.05)
        procs[1].send_signal(signal.SIGSTOP)
        procs[0].wait(timeout=60)
    finally:
        for p in procs:
            p.kill()
    err = procs[0].stderr.read() if procs[0].stderr else ""
    assert procs[0].returncode != 0
    assert "timed out" in err.lower() or "timeout" in err.lower(), err[-2000:]
