"""One process of a multi-process ``blockssl pretrain`` with a fault injected (tests/test_dist_faults.py).

    python tests/fault_process.py FAULT STEP pretrain key=value ...

The process whose ``RANK`` equals ``FAULT_RANK`` injects ``FAULT`` when it starts step ``STEP`` (1-based), or, for
``save``, in the checkpoint save after that step; every other process runs the command unchanged:

- ``raise``: an exception in the training step;
- ``kill``: SIGKILL to itself (a node lost, the OOM killer);
- ``worker``: SIGKILL to one of its DataLoader workers;
- ``save``: SIGKILL to itself inside the checkpoint save (a pipeline stage sending its part to rank 0, or rank 0
  writing).
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
from collections.abc import Callable
from typing import Any

import blockssl.train as train
from blockssl.cli import main
from blockssl.strategy import Local, Stage


class InjectedFault(RuntimeError):
    pass


def inject(fault: str, at: int) -> None:
    lr_factor = train.lr_factor

    def lr_factor_with_fault(step: int, *args: object) -> float:  # called once per step, with the step from 0
        if step + 1 == at:
            if fault == "raise":
                raise InjectedFault(f"injected fault at step {at}")
            if fault == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            if fault == "worker":
                os.kill(multiprocessing.active_children()[0].pid, signal.SIGKILL)
        return lr_factor(step, *args)  # type: ignore[arg-type]

    def with_fault(checkpoint: Callable[..., Any]) -> Callable[..., Any]:
        saves = []

        def checkpoint_with_fault(*args: object) -> Any:  # a checkpoint after every step: the AT-th is step AT's
            saves.append(1)
            if len(saves) == at:
                os.kill(os.getpid(), signal.SIGKILL)
            return checkpoint(*args)
        return checkpoint_with_fault

    if fault == "save":
        for kind in (Local, Stage):
            kind.checkpoint = with_fault(kind.checkpoint)  # type: ignore[method-assign]
    else:
        train.lr_factor = lr_factor_with_fault  # type: ignore[assignment]


if __name__ == "__main__":
    fault, at, *command = sys.argv[1:]
    if os.environ["RANK"] == os.environ["FAULT_RANK"]:
        inject(fault, int(at))
    sys.exit(main(command))
