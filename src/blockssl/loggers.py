"""Where a run's metrics go (``train.loggers``): ``metrics.jsonl``, TensorBoard, Weights & Biases.

Every logger receives the same records: at each logging step of pretraining, what ``metrics.jsonl`` gets (per-block
losses and spreads, online-probe accuracies, lr, images/s, weight change, RankMe, saved memory when measured), with
``step`` the global step; after evaluation, ``blockssl probe`` and ``blockssl robustness`` results at the step of
the checkpoint they evaluated. Only the one process that writes ``metrics.jsonl`` logs.

``jsonl`` is always on: ``metrics.jsonl`` is the run directory's record, which the report reads and resume
truncates (configuration validation adds it when left out). Evaluation results go to the other loggers only, since
``probe.json`` and ``robustness.json`` hold them. TensorBoard and wandb are optional extras: a missing package is a
:class:`~blockssl.config.ConfigError` naming the extra to install, raised before any work.
"""

from __future__ import annotations

import importlib.util
import json
import netrc
import os
import secrets
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, Protocol

from blockssl.checkpoint import atomic_write_text
from blockssl.config import Config, ConfigError, to_dict

Record = Mapping[str, Any]  # "step" (the global step) and named values

# The optional loggers. Each one's package, pip extra and folder in the run directory (which a run started afresh
# with --overwrite deletes) have its name.
OPTIONAL = ("tensorboard", "wandb")


class Logger(Protocol):
    """A destination of records: ``log`` each one, ``close`` once at the end."""

    def log(self, record: Record) -> None: ...

    def close(self) -> None: ...


def check_installed(names: Iterable[str]) -> None:
    """Raise, naming the extra to install, if a logger's package is missing (a cheap check: nothing is imported)."""
    for name in names:
        if name in OPTIONAL and importlib.util.find_spec(name) is None:
            raise ConfigError(f"train.loggers: {name} needs the {name} package; install it with "
                              f"pip install 'blockssl[{name}]'")


def scalars(record: Record) -> dict[str, float]:
    """A record's numbers by name, without ``step``. Other values are skipped (training records have none); NaN and
    infinities are kept, so that a diverging block shows instead of vanishing."""
    return {k: float(v) for k, v in record.items() if k != "step" and isinstance(v, int | float)}


class JsonlLogger:
    """``metrics.jsonl``: one JSON line per record, each appended and closed at once, so a killed run loses none.
    Resuming from the checkpoint of step N drops the lines logged after it, so that no step appears twice."""

    def __init__(self, path: Path, resume_step: int | None = None) -> None:
        self.path = path
        if resume_step is not None and path.is_file():
            lines = [line for line in path.read_text().splitlines()
                     if line.strip() and json.loads(line)["step"] <= resume_step]
            atomic_write_text(path, "".join(line + "\n" for line in lines))

    def log(self, record: Record) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def close(self) -> None:
        """Nothing is held open."""


class TensorBoardLogger:
    """Event files in ``<run>/tensorboard``, one scalar per name. Resuming from the checkpoint of step N purges what
    the interrupted call logged after N (``purge_step``: TensorBoard hides those events), as ``metrics.jsonl`` does."""

    def __init__(self, folder: Path, resume_step: int | None = None) -> None:
        check_installed(["tensorboard"])
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(folder), purge_step=None if resume_step is None else resume_step + 1)

    def log(self, record: Record) -> None:
        step = int(record["step"])
        for name, value in scalars(record).items():
            self.writer.add_scalar(name, value, step)

    def close(self) -> None:
        self.writer.close()


class WandbLogger:
    """A Weights & Biases run writing under ``<run>/wandb``, with the configuration logged.

    Mode: ``WANDB_MODE`` when set; otherwise online if an API key is configured (``WANDB_API_KEY`` or ``wandb
    login``), else offline (``wandb sync <run>/wandb/offline-run-*`` uploads it later): a run never waits on a login
    prompt. Project ``WANDB_PROJECT``, default ``blockssl``; the run is named after its directory. Its id is kept
    in ``<run>/wandb/blockssl-run-id``, so that a resumed run and its evaluations continue the same wandb run.
    wandb's own step only increases, so every metric is plotted against ``global_step`` instead: evaluation results
    land at the step they evaluated, and steps a resumed run repeats (those after its checkpoint) appear twice, with
    the same values but images/s (a resumed run computes what the uninterrupted one did)."""

    def __init__(self, run_dir: Path, config: dict[str, Any]) -> None:
        check_installed(["wandb"])
        import wandb

        id_file = run_dir / "wandb" / "blockssl-run-id"
        if not id_file.is_file():
            atomic_write_text(id_file, secrets.token_hex(8))  # a run id of wandb's alphabet, made once per run
        # WANDB_MODE decides when set (wandb reads it); otherwise no run waits on a login prompt.
        mode: Literal["online", "offline"] | None = None
        if not os.environ.get("WANDB_MODE"):
            mode = "online" if _wandb_key_configured() else "offline"
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "blockssl"), name=run_dir.resolve().name,
                              dir=str(run_dir), config=config, allow_val_change=True,  # resumable keys may change
                              id=id_file.read_text().strip(), resume="allow", mode=mode)
        self.run.define_metric("global_step")
        self.run.define_metric("*", step_metric="global_step")

    def log(self, record: Record) -> None:
        self.run.log({**scalars(record), "global_step": int(record["step"])})

    def close(self) -> None:
        self.run.finish()


def _wandb_key_configured() -> bool:
    """Whether wandb has an API key: ``WANDB_API_KEY``, or the ~/.netrc entry that ``wandb login`` writes."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (OSError, netrc.NetrcParseError):
        return False


class Loggers:
    """Several loggers behind one ``log`` and ``close`` (none: a process that does not log)."""

    def __init__(self, loggers: Sequence[Logger] = ()) -> None:
        self.loggers = list(loggers)

    def log(self, record: Record) -> None:
        for logger in self.loggers:
            logger.log(record)

    def close(self) -> None:
        for logger in self.loggers:
            logger.close()

    def __enter__(self) -> Loggers:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()  # also on an error: the last records are the ones that explain it


def _build(names: Sequence[str], run_dir: Path, cfg: Config, resume_step: int | None) -> Loggers:
    check_installed(names)  # every package before any logger writes
    build: dict[str, Callable[[], Logger]] = {
        "jsonl": lambda: JsonlLogger(run_dir / "metrics.jsonl", resume_step),
        "tensorboard": lambda: TensorBoardLogger(run_dir / "tensorboard", resume_step),
        "wandb": lambda: WandbLogger(run_dir, to_dict(cfg)),
    }
    return Loggers([build[name]() for name in names])


def training_loggers(cfg: Config, run_dir: Path, resume_step: int | None = None) -> Loggers:
    """The loggers of ``cfg.train.loggers`` for pretraining into ``run_dir``; ``resume_step``: the step of the
    checkpoint a resumed run continues from."""
    return _build(cfg.train.loggers, run_dir, cfg, resume_step)


def evaluation_loggers(cfg: Config, run_dir: Path) -> Loggers:
    """The run's loggers but ``jsonl`` (``probe.json`` and ``robustness.json`` hold evaluation results), for
    evaluation results logged at the step of the checkpoint evaluated."""
    return _build([name for name in cfg.train.loggers if name != "jsonl"], run_dir, cfg, None)
