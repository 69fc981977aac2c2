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

import blockssl.train as train
from blockssl.cli import main


class InjectedFault(RuntimeError):
    pass


def inject(fault: str, at: int) -> None:
    lr_factor, save = train.lr_factor, train._save

    def lr_factor_with_fault(step: int, *args: object) -> float:  # called once per step, with the step from 0
        if step + 1 == at:
            if fault == "raise":
                raise InjectedFault(f"injected fault at step {at}")
            if fault == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            if fault == "worker":
                os.kill(multiprocessing.active_children()[0].pid, signal.SIGKILL)
        return lr_factor(step, *args)  # type: ignore[arg-type]

    def save_with_fault(out: object, model: object, layout: object, optimizers: object, scaler: object, step: int,
                        *args: object, **kwargs: object) -> None:
        if step == at:
            os.kill(os.getpid(), signal.SIGKILL)
        save(out, model, layout, optimizers, scaler, step, *args, **kwargs)  # type: ignore[arg-type]

    if fault == "save":
        train._save = save_with_fault  # type: ignore[assignment]
    else:
        train.lr_factor = lr_factor_with_fault  # type: ignore[assignment]


if __name__ == "__main__":
    fault, at, *command = sys.argv[1:]
    if os.environ["RANK"] == os.environ["FAULT_RANK"]:
        inject(fault, int(at))
    sys.exit(main(command))
