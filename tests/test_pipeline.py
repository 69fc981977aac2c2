"""Pipeline training against single-process lean training: the same parameters, optimizer state and logged terms
for 2 and 4 stages and an uneven grouping, 2 stages x 2 replicas against one process with the global batch,
resume across executions, the record handed between stages, stage balancing, and launches that cannot work."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from blockssl.checkpoint import load_checkpoint
from blockssl.config import ConfigError, resume_config
from blockssl.execution import StepTerms
from blockssl.pipeline import _decode, _encode, balanced_stages
from blockssl.train import pretrain
from tests.conftest import DDP_RUN, assert_same_model, assert_same_tensors, run_metrics, spawn, tiny_config

# Noise on (keyed by block and step, so placement does not matter) and the online probe on (merged per block).
RUN = ["noise.type=global", "noise.std=0.25", "online_probe.enabled=true", "train.checkpoint_every=3"]


def _worker(rank: int, world: int, out: str, overrides: list[str], stop_after: int | None, resume: bool) -> None:
    cfg = resume_config(out, overrides) if resume else tiny_config(out, *overrides)
    pretrain(cfg, resume=resume, stop_after=stop_after)


def _terms(run) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "images_per_sec"} for r in run_metrics(run)]


def assert_same_run(a, b) -> None:
    """Bit-identical weights, buffers, optimizer and probe states, and logged terms."""
    sa, sb = load_checkpoint(a / "checkpoints/last.pt"), load_checkpoint(b / "checkpoints/last.pt")
    assert sa["step"] == sb["step"]
    assert_same_tensors(sa["model"], sb["model"])
    assert sa["optimizers"].keys() == sb["optimizers"].keys()
    for key, opt in sa["optimizers"].items():
        for index, state in opt["state"].items():
            assert_same_tensors(state, sb["optimizers"][key]["state"][index])
    assert_same_tensors(sa["online_probe"]["module"], sb["online_probe"]["module"])
    assert _terms(a) == _terms(b)
    assert sa["counts"] == sb["counts"]


# Blocks ending inside ResNet layers (model.granularity=unit), as blockssl cost --balance groups them
UNITS = ["model.granularity=unit", "model.blocks=stem-layer2.0,layer2.1-layer3.0,layer3.1-layer4.0,layer4.1"]


@pytest.mark.parametrize(("stages", "world", "model"), [
    ("1+2,3+4", 2, []), ("blocks", 4, []), ("1,2+3+4", 2, []), ("1+2,3+4", 2, UNITS)])
def test_pipeline_equals_single_process_lean(tmp_path, stages, world, model):
    lean = pretrain(tiny_config(tmp_path / "lean", *RUN, *model, "train.execution=lean"))
    spawn(_worker, world, str(tmp_path / "pipe"), [*RUN, *model, "train.execution=pipeline",
                                                   f"train.stages={stages}"], None, False)
    assert_same_run(lean, tmp_path / "pipe")
    assert (tmp_path / "pipe/backbone.pt").is_file()
    assert_same_tensors(torch.load(lean / "backbone.pt"), torch.load(tmp_path / "pipe/backbone.pt"))


def test_two_stages_times_two_replicas_train_like_one_process_with_the_global_batch(tmp_path):
    single = pretrain(tiny_config(tmp_path / "one", *DDP_RUN))
    spawn(_worker, 4, str(tmp_path / "2x2"), [*DDP_RUN, "train.execution=pipeline", "train.stages=1+2,3+4"],
          None, False)
    assert_same_model(single, tmp_path / "2x2")


def test_pipeline_checkpoint_resumes_in_one_process_and_the_reverse(tmp_path):
    lean = pretrain(tiny_config(tmp_path / "lean", *RUN, "train.execution=lean"))
    pipeline = [*RUN, "train.execution=pipeline", "train.stages=1+2,3+4"]
    spawn(_worker, 2, str(tmp_path / "a"), pipeline, 3, False)  # every stage stops at step 3
    assert load_checkpoint(tmp_path / "a/checkpoints/last.pt")["step"] == 3
    pretrain(resume_config(tmp_path / "a", ["train.execution=lean"]), resume=True)
    assert_same_run(lean, tmp_path / "a")

    pretrain(tiny_config(tmp_path / "b", *RUN, "train.execution=lean"), stop_after=5)
    spawn(_worker, 2, str(tmp_path / "b"), ["train.execution=pipeline", "train.stages=1+2,3+4"], None, True)
    assert_same_run(lean, tmp_path / "b")


def test_pipeline_needs_a_multiple_of_its_stages_in_processes(tmp_path):
    with pytest.raises(ConfigError, match="processes cannot hold 4 stages"):
        pretrain(tiny_config(tmp_path / "run", "train.execution=pipeline"))
    assert not (tmp_path / "run").exists()  # refused before the run directory exists


def test_terms_cross_the_wire_and_merge_into_what_one_process_logs():
    first, second = StepTerms(skipped=1, replaced=2), StepTerms()
    first.block(0).loss, first.block(0).spread = torch.tensor(2.0), torch.tensor(0.5)
    second.block(2).loss, second.block(2).spread = torch.tensor(float("nan")), torch.tensor(0.25)
    second.block(2).saved_mb = 3.0  # measured at logging steps only (train.log_saved_memory)
    first.block(0).weight_change, second.block(2).weight_change = torch.tensor(0.04), torch.tensor(0.5)
    first.block(0).rankme, first.block(1).rankme = torch.tensor(12.5), torch.tensor(3.0)  # no loss, but features
    first.block(0).online_top1, first.block(0).online_loss = 40.0, 1.5
    loss_mask = 1  # block 1 carries a loss (sent in the header)
    received = _decode(_encode(first, 4, torch.device("cpu")), loss_mask, 4)
    terms_sent = received.merge(second)
    assert int(terms_sent.skipped) == 1 and int(terms_sent.replaced) == 2
    merged = first.merge(second)  # what one process holding every block logs
    terms = terms_sent.logged()
    assert terms == pytest.approx(merged.logged(), nan_ok=True) and list(terms) == list(merged.logged())
    assert list(terms)[:5] == ["loss", "loss/block1", "std/block1", "loss/block3", "std/block3"]
    assert terms["saved_mb/block3"] == 3.0 and "saved_mb/block1" not in terms
    assert [k for k in terms if k.startswith(("weight_change/", "rankme/"))] == [
        "weight_change/block1", "weight_change/block3", "rankme/block1", "rankme/block2"]
    assert terms["weight_change/block1"] == pytest.approx(0.04) and terms["rankme/block2"] == 3.0
    assert terms["loss/block1"] == 2.0 and terms["std/block3"] == 0.25 and terms["online/block1_top1"] == 40.0
    assert terms["loss/block3"] != terms["loss/block3"]  # a non-finite loss is logged, not dropped
    assert "online/block3_top1" not in terms


def test_balanced_stages_minimise_the_slowest_stage():
    assert balanced_stages([1.0, 1.0, 1.0, 1.0], 2) == [[0, 1], [2, 3]]
    assert balanced_stages([3.0, 1.0, 1.0, 1.0], 2) == [[0], [1, 2, 3]]
    assert balanced_stages([1.0, 2.0, 3.0, 4.0], 2) == [[0, 1, 2], [3]]
    assert balanced_stages([1.0, 2.0, 3.0, 4.0], 4) == [[0], [1], [2], [3]]


def _signalled_worker(rank: int, world: int, out: str, overrides: list[str]) -> None:
    """A 2-stage run whose stage 0 receives SIGTERM once step 2 is logged; every stage must stop at one step."""
    import os
    import signal
    import threading
    import time
    from pathlib import Path

    from blockssl.train import Preempted

    def signal_when_logged() -> None:
        metrics = Path(out) / "metrics.jsonl"
        while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 2):
            time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGTERM)

    if rank == 0:
        threading.Thread(target=signal_when_logged, daemon=True).start()
    try:
        pretrain(tiny_config(out, *overrides))
    except Preempted as e:
        Path(f"{out}.preempted.{rank}").write_text(str(e))


def test_a_signalled_pipeline_stops_every_stage_at_one_step_and_resumes_exactly(tmp_path):
    lean = pretrain(tiny_config(tmp_path / "lean", *RUN, "train.execution=lean"))
    spawn(_signalled_worker, 2, str(tmp_path / "pipe"), [*RUN, "train.execution=pipeline", "train.stages=1+2,3+4"])
    messages = [(tmp_path / f"pipe.preempted.{r}").read_text() for r in range(2)]
    assert messages[0] == messages[1] and "stopped by signal 15" in messages[0]  # the same step in both stages
    step = load_checkpoint(tmp_path / "pipe/checkpoints/last.pt")["step"]
    assert 2 <= step < 8 and f"at step {step};" in messages[0]
    spawn(_worker, 2, str(tmp_path / "pipe"), [], None, True)
    assert_same_run(lean, tmp_path / "pipe")


def _later_stage_without_data_worker(rank: int, world: int, out: str, overrides: list[str]) -> None:
    if rank > 0:  # stage 2 of 2: it must take the dataset's length from stage 1, not read the data itself
        def refuse(cfg):
            raise AssertionError("a later pipeline stage built the pretraining set")

        monkeypatch = pytest.MonkeyPatch()
        monkeypatch.setattr("blockssl.strategy.two_view_dataset", refuse)
    pretrain(tiny_config(out, *overrides))


def test_later_stages_take_the_dataset_length_from_the_first_and_never_read_images(tmp_path):
    pipeline = ["train.execution=pipeline", "train.stages=1+2,3+4", "train.epochs=1"]
    spawn(_later_stage_without_data_worker, 2, str(tmp_path / "pipe"), pipeline)
    lean = pretrain(tiny_config(tmp_path / "lean", "train.execution=lean", "train.epochs=1"))
    assert [r["step"] for r in run_metrics(tmp_path / "pipe")] == [r["step"] for r in run_metrics(lean)] == [1, 2, 3, 4]


def _failing_worker(rank: int, world: int, out: str, overrides: list[str]) -> None:
    try:
        pretrain(tiny_config(out, *overrides))
    except Exception as e:
        Path(f"{out}.error.{rank}").write_text(f"{type(e).__name__}: {e}")


def test_a_bad_data_root_fails_every_stage_with_the_first_stages_error(tmp_path):
    """The first stage's error reaches the later one (no process waits for a broadcast that never comes)."""
    bad = ["train.execution=pipeline", "train.stages=1+2,3+4", "data.name=fashion_mnist",
           f"data.root={tmp_path / 'missing'}"]
    spawn(_failing_worker, 2, str(tmp_path / "pipe"), bad)
    first, later = ((tmp_path / f"pipe.error.{r}").read_text() for r in range(2))
    assert first.startswith("FileNotFoundError: Fashion-MNIST not found in")
    assert later == f"RuntimeError: the first pipeline stage could not read the pretraining set: {first}"
