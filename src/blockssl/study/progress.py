"""Where a study stands: each run done (its evaluation files suffice), trained, started or not, the seconds spent
on it, and the time left."""

from __future__ import annotations

import math
import statistics
from typing import Any

from blockssl.reporting import read_json
from blockssl.study.spec import TIMING, Study


def missing_evaluations(study: Study, variant: str, seed: int) -> list[str]:
    """The evaluations of the run whose result file (``probe.json``, ``robustness.json``) is not there yet."""
    wanted = {"probe": "probe.json", "robustness": "robustness.json"}
    return [e for e in study.evaluations(variant) if not (study.run_dir(variant, seed) / wanted[e]).is_file()]


def is_done(study: Study, variant: str, seed: int) -> bool:
    """Evaluated (its evaluation files suffice), or trained when the study evaluates nothing."""
    trained = (study.run_dir(variant, seed) / "backbone.pt").is_file()
    return not missing_evaluations(study, variant, seed) and (bool(study.evaluate) or trained)


def status(study: Study) -> list[dict[str, Any]]:
    """Per run: ``state`` (done; trained, evaluations missing; started, at ``step``; or not started) and the
    ``seconds`` spent on it so far (``study_timing.json``)."""
    from blockssl.checkpoint import load_checkpoint

    rows = []
    for variant, seed in study.runs():
        run = study.run_dir(variant, seed)
        timing = read_json(run / TIMING) or {}
        step = None
        if is_done(study, variant, seed):
            state = "done"
        elif (run / "backbone.pt").is_file():
            state = "trained, to evaluate: " + ", ".join(missing_evaluations(study, variant, seed))
        elif (run / "checkpoints" / "last.pt").is_file():  # mapped: only the step is read
            state, step = "started", load_checkpoint(run / "checkpoints" / "last.pt", mmap=True)["step"]
        else:
            state = "not started"
        rows.append(dict(variant=variant, seed=seed, state=state, step=step, seconds=sum(timing.values())))
    return rows


def format_status(rows: list[dict[str, Any]]) -> str:
    """The status table, and how many runs are done; the time left is estimated from each variant's fastest
    finished run (the median run of any variant when none of it has finished): a resumed or shared-machine run
    counts its stalls, the fastest one is closest to what a quiet machine takes."""
    lines = [f"{'variant':<24}{'seed':>5}  {'seconds':>8}  state"]
    lines += [f"{r['variant']:<24}{r['seed']:>5}  {r['seconds']:>8.0f}  {r['state']}"
              + (f" (checkpoint at step {r['step']})" if r["step"] is not None else "") for r in rows]
    done = [r for r in rows if r["state"] == "done"]
    lines.append(f"{len(done)} of {len(rows)} runs done")
    if done and len(done) < len(rows):
        fastest: dict[str, float] = {}
        for r in done:
            fastest[r["variant"]] = min(r["seconds"], fastest.get(r["variant"], math.inf))
        typical = statistics.median(r["seconds"] for r in done)
        left = sum(max(0.0, fastest.get(r["variant"], typical) - r["seconds"]) for r in rows if r["state"] != "done")
        lines.append(f"about {left / 3600:.1f} h left at the pace of each variant's fastest finished run")
    return "\n".join(lines)
