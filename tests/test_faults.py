"""Fault-injection suite: kills, broken checkpoints, numerical faults, bad data, bad input, failing disks.

Each case injects a fault and checks that the promised behaviour holds and that no work is lost.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import blockssl.checkpoint as checkpoint_module
from blockssl.checkpoint import CheckpointError, atomic_save, load_checkpoint, save_checkpoint
from blockssl.cli import EXIT_BAD_INPUT, EXIT_NONFINITE, EXIT_PREEMPTED, main
from blockssl.config import DataConfig, resume_config
from blockssl.data.datasets import BadImageError, build_dataset, load_rgb
from blockssl.execution import NonFiniteLossError
from blockssl.loggers import JsonlLogger
from blockssl.losses import BarlowTwinsLoss
from blockssl.runtime import progress_bar
from blockssl.train import _log, pretrain
from tests.conftest import TINY, assert_same_tensors, run_metrics, tiny_config

ROOT = Path(__file__).resolve().parents[1]
# 64 images / 16 per batch = 4 steps per epoch; 3 epochs; a checkpoint after every step.
KILL_RUN = ["train.epochs=3", "train.checkpoint_every=1", "noise.type=global"]


def _params(run: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(run / "checkpoints/last.pt")["model"]


def _start(out: Path, *extra: str) -> subprocess.Popen:
    # Same thread count as this process: CPU kernels reduce in a thread-dependent order. Its own process group,
    # so that a test can signal it with its loader workers, as a scheduler or Ctrl-C does.
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": str(torch.get_num_threads())}
    return subprocess.Popen([sys.executable, "-m", "blockssl", "pretrain", *TINY, *KILL_RUN, f"out={out}", *extra],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def _wait_for_step(out: Path, step: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    metrics = out / "metrics.jsonl"
    while time.monotonic() < deadline:
        if metrics.is_file():
            lines = metrics.read_text().splitlines()
            if lines and json.loads(lines[-1])["step"] >= step:
                return
        if proc.poll() is not None:
            raise AssertionError(f"training ended early: {proc.stderr.read() if proc.stderr else ''}")
        time.sleep(0.02)
    raise AssertionError(f"step {step} not reached in {timeout} s")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict[str, torch.Tensor]:
    return _params(pretrain(tiny_config(tmp_path_factory.mktemp("full") / "run", *KILL_RUN)))


# --- kills -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kill_at", [2, 7])
def test_sigkill_then_resume_equals_uninterrupted(tmp_path, uninterrupted, kill_at):
    out = tmp_path / "run"
    proc = _start(out)
    _wait_for_step(out, kill_at, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert load_checkpoint(out / "checkpoints/last.pt")["step"] >= kill_at - 1  # nothing older than a step
    pretrain(resume_config(out), resume=True)
    assert_same_tensors(_params(out), uninterrupted)
    steps = [r["step"] for r in run_metrics(out)]
    assert steps == list(range(1, 13))  # lines logged after the checkpoint were dropped, none repeated


def test_sigterm_checkpoints_and_exits_with_the_preemption_status(tmp_path, uninterrupted):
    """SIGTERM to the whole process group, loader worker included (the worker leaves it to the trainer)."""
    out = tmp_path / "run"
    proc = _start(out, "data.num_workers=1")
    _wait_for_step(out, 3, proc)
    os.killpg(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_PREEMPTED, err
    assert "--resume" in err
    step = load_checkpoint(out / "checkpoints/last.pt")["step"]
    assert 3 <= step < 12
    pretrain(resume_config(out), resume=True)
    assert_same_tensors(_params(out), uninterrupted)


# --- checkpoints ---------------------------------------------------------------------------------------------------

def test_truncated_checkpoint_is_a_clear_error(tmp_path):
    path = tmp_path / "last.pt"
    atomic_save({"format_version": 1, "x": torch.zeros(1000)}, path)
    path.write_bytes(path.read_bytes()[:500])
    with pytest.raises(CheckpointError, match="truncated, corrupt or not a blockssl checkpoint"):
        load_checkpoint(path)


def test_foreign_checkpoint_is_a_clear_error(tmp_path):
    torch.save({"state_dict": {}}, tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="not a blockssl training checkpoint"):
        load_checkpoint(tmp_path / "foreign.pt")
    torch.save({"format_version": 99}, tmp_path / "future.pt")
    with pytest.raises(CheckpointError, match="format 99"):
        load_checkpoint(tmp_path / "future.pt")


class _Payload:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_checkpoint_cannot_run_code(tmp_path):
    torch.save({"format_version": 1, "payload": _Payload()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="cannot be read"):
        load_checkpoint(tmp_path / "evil.pt")


def test_failed_write_leaves_previous_checkpoint_intact(tmp_path, monkeypatch):
    folder = tmp_path / "checkpoints"
    save_checkpoint({"format_version": 1, "step": 1}, folder, 1, keep=2)

    def fail(obj, f):
        f.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint_module.torch, "save", fail)
    with pytest.raises(CheckpointError, match="previous checkpoints there are intact"):
        save_checkpoint({"format_version": 1, "step": 2}, folder, 2, keep=2)
    assert load_checkpoint(folder / "last.pt")["step"] == 1
    assert sorted(p.name for p in folder.iterdir()) == ["last.pt", "step-00000001.pt"]  # no temporary left


def test_only_the_newest_checkpoints_are_kept(tmp_path):
    folder = tmp_path / "checkpoints"
    for step in range(1, 6):
        save_checkpoint({"format_version": 1, "step": step}, folder, step, keep=2)
    assert sorted(p.name for p in folder.iterdir()) == ["last.pt", "step-00000004.pt", "step-00000005.pt"]
    assert load_checkpoint(folder / "last.pt")["step"] == 5


def test_unwritable_run_directory_is_reported(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root ignores directory permissions")
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    with pytest.raises(CheckpointError):
        save_checkpoint({"format_version": 1}, folder, 1, keep=1)


# --- numerical faults ----------------------------------------------------------------------------------------------

def _nan_in_block(monkeypatch, block: int, at_call: int) -> None:
    """Block ``block``'s loss (1-based) returns NaN from call ``at_call`` of that block on."""
    original = BarlowTwinsLoss.forward
    calls = {"n": 0}

    def forward(self, z1, z2):
        calls["n"] += 1
        loss = original(self, z1, z2)
        k = (calls["n"] - 1) % 4 + 1
        return loss * float("nan") if k == block and calls["n"] > 4 * (at_call - 1) else loss

    monkeypatch.setattr(BarlowTwinsLoss, "forward", forward)


def test_nan_loss_stops_naming_block_term_and_step_and_keeps_the_checkpoint(tmp_path, monkeypatch):
    cfg = tiny_config(tmp_path / "run", "train.epochs=2")  # checkpoint after epoch 1 (step 4)
    _nan_in_block(monkeypatch, block=3, at_call=6)
    with pytest.raises(NonFiniteLossError, match=r"block 3 loss \(BarlowTwinsLoss\) is nan at step 5"):
        pretrain(cfg)
    assert load_checkpoint(tmp_path / "run/checkpoints/last.pt")["step"] == 4
    assert all(torch.isfinite(v).all() for v in _params(tmp_path / "run").values() if v.is_floating_point())


def test_nan_loss_exit_status(tmp_path, monkeypatch, capsys):
    _nan_in_block(monkeypatch, block=2, at_call=1)
    assert main(["pretrain", *TINY, f"out={tmp_path / 'run'}"]) == EXIT_NONFINITE
    assert "block 2 loss" in capsys.readouterr().err


def test_nan_loss_can_be_skipped_and_counted(tmp_path, monkeypatch):
    _nan_in_block(monkeypatch, block=1, at_call=7)  # block 1 from step 7 on: steps 7 and 8 skipped for it
    run = pretrain(tiny_config(tmp_path / "run", "train.on_nonfinite=skip"))
    last = run_metrics(run)[-1]
    assert last["nonfinite_skipped"] == 2
    assert all(torch.isfinite(v).all() for v in _params(run).values() if v.is_floating_point())


def test_nan_gradient_is_caught(tmp_path, monkeypatch):
    original = torch.Tensor.backward

    def backward(self, *args, **kwargs):
        original(self, *args, **kwargs)
        for p in model_params:
            if p.grad is not None:
                p.grad.fill_(float("inf"))
                break

    from blockssl import method

    model_params: list[torch.nn.Parameter] = []
    original_init = method.BlockwiseSSL.__init__

    def init(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        model_params.extend(self.heads[1].parameters())

    monkeypatch.setattr(method.BlockwiseSSL, "__init__", init)
    monkeypatch.setattr(torch.Tensor, "backward", backward)
    with pytest.raises(NonFiniteLossError, match="block 2 gradient is inf at step 0"):
        pretrain(tiny_config(tmp_path / "run"))


def test_collapse_is_warned(tmp_path):
    record = {"step": 3, "images_per_sec": 1.0, "loss/block2": 1.0, "std/block2": 0.001, "std/block1": 0.9}
    with pytest.warns(UserWarning, match="block2: embedding spread"):
        _log(JsonlLogger(tmp_path / "metrics.jsonl"), record, progress_bar(enabled=False))


# --- bad data ------------------------------------------------------------------------------------------------------

def _image_folder(root: Path, extra: dict[str, bytes | Image.Image]) -> None:
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for cls in ("a", "b"):
            folder = root / split / cls
            folder.mkdir(parents=True)
            for i in range(12):
                Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    for name, content in extra.items():
        path = root / "train" / "a" / name
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            content.save(path)


UNUSUAL_MODES = {
    "gray.png": Image.new("L", (20, 20), 100),
    "rgba.png": Image.new("RGBA", (20, 20), (10, 20, 30, 128)),
    "palette.png": Image.new("P", (20, 20), 3),
    "cmyk.jpg": Image.new("CMYK", (20, 20), (10, 20, 30, 40)),
    "deep.png": Image.fromarray(np.full((20, 20), 40000, dtype=np.uint16)),
    "binary.png": Image.new("1", (20, 20), 1),
}


@pytest.mark.parametrize("name", sorted(UNUSUAL_MODES))
def test_unusual_image_modes_load_as_rgb(tmp_path, name):
    UNUSUAL_MODES[name].save(tmp_path / name)
    image = load_rgb(str(tmp_path / name))
    assert image.mode == "RGB" and image.size == (20, 20)
    if name == "deep.png":  # 16-bit scaled to 8 bits, not clipped to white
        assert np.asarray(image).max() == round(40000 / 65535 * 255)


def _png_bytes() -> bytes:
    import io

    buffer = io.BytesIO()
    Image.new("RGB", (20, 20), (200, 10, 10)).save(buffer, format="PNG")
    return buffer.getvalue()


BROKEN = {
    "truncated.png": _png_bytes()[:60],
    "not_an_image.jpg": b"this is a text file with an image extension",
    "empty.png": b"",
}


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_broken_image_is_named(tmp_path, name):
    (tmp_path / name).write_bytes(BROKEN[name])
    with pytest.raises(BadImageError, match=name):
        load_rgb(str(tmp_path / name))


def _folder_overrides(root: Path, out: Path, *extra: str) -> list[str]:
    return [*TINY, "data.name=imagefolder", f"data.root={root}", "data.image_size=16", f"out={out}",
            "train.epochs=1", *extra]


def test_broken_images_are_replaced_and_counted(tmp_path):
    _image_folder(tmp_path / "data", {**BROKEN, **UNUSUAL_MODES, "notes.txt": b"ignored: not an image extension"})
    assert main(["pretrain", *_folder_overrides(tmp_path / "data", tmp_path / "run")]) == 0
    rows = run_metrics(tmp_path / "run")
    assert rows[-1]["bad_images_replaced"] == len(BROKEN)  # one epoch sees every image once


def test_broken_images_fail_the_run_when_strict(tmp_path, capsys):
    _image_folder(tmp_path / "data", {"truncated.png": BROKEN["truncated.png"]})
    code = main(["pretrain", *_folder_overrides(tmp_path / "data", tmp_path / "run", "data.strict=true",
                                                "data.num_workers=1")])
    assert code == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert "truncated.png" in err and "data.strict" in err and "Traceback" not in err


@pytest.mark.parametrize("layout", ["missing", "empty", "no_val"])
def test_missing_or_empty_data_root(tmp_path, layout):
    root = tmp_path / "data"
    if layout != "missing":
        (root / "train").mkdir(parents=True)
    if layout == "no_val":
        _image_folder(tmp_path / "other", {})
        (root / "train").rmdir()
        (tmp_path / "other/train").rename(root / "train")
    with pytest.raises(FileNotFoundError):
        build_dataset(DataConfig(name="imagefolder", root=str(root)), "test" if layout == "no_val" else "train")


# --- bad input -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("override", "message"), [
    ("train.epohcs=3", "did you mean 'train.epochs'"),
    ("train.epochs=-1", "at least 1"),
    ("train.epochs=ten", "expected an integer"),
    ("train.batch_size=1", "at least 2"),
    ("train.batch_size=128", "larger than data.synthetic_size"),
    ("model.blocks=stem+layer1,layer1,layer2,layer3,layer4", "exactly once"),
    ("model.blocks=stem,layer2,layer3,layer4", "exactly once"),
    ("model.head=mlp", "gap, cbe"),
    ("loss.name=byol", "barlow_twins, simclr, vicreg"),
    ("noise.std=nan", "finite"),
])
def test_bad_input_fails_before_any_compute(tmp_path, capsys, override, message):
    assert main(["pretrain", *TINY, f"out={tmp_path / 'run'}", override]) == EXIT_BAD_INPUT
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_batch_larger_than_an_image_folder(tmp_path, capsys):
    _image_folder(tmp_path / "data", {})
    assert main(["pretrain", *_folder_overrides(tmp_path / "data", tmp_path / "run", "train.batch_size=32")]) == 2
    assert "larger than the dataset (24 images)" in capsys.readouterr().err


def test_resume_with_conflicting_config_lists_differences(tmp_path, capsys):
    run = pretrain(tiny_config(tmp_path / "run", "train.epochs=1"))
    assert main(["pretrain", "--resume", str(run), "train.lr=0.3", "loss.name=vicreg"]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert "train.lr: 0.2 -> 0.3" in err and "loss.name: 'barlow_twins' -> 'vicreg'" in err
    assert resume_config(run, ["data.num_workers=2"]).data.num_workers == 2  # what does not change results may


def test_existing_run_is_refused_unless_overwrite(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["pretrain", *TINY, f"out={out}", "train.epochs=1"]) == 0
    assert main(["pretrain", *TINY, f"out={out}", "train.epochs=1"]) == EXIT_BAD_INPUT
    assert "--overwrite" in capsys.readouterr().err
    before = _params(out)
    assert main(["pretrain", *TINY, f"out={out}", "train.epochs=1", "--overwrite"]) == 0
    assert_same_tensors(before, _params(out))  # same config and seed: the same run again


def test_resume_of_a_run_without_checkpoint(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.yaml").write_text("seed: 0\n")
    with pytest.raises(CheckpointError, match="no checkpoint"):
        pretrain(resume_config(out), resume=True)
