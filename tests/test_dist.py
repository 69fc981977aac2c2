"""Two gloo processes on the CPU against one process with the same global batch: losses, training, resume."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist

from blockssl.checkpoint import load_checkpoint
from blockssl.config import resume_config
from blockssl.dist import init_from_environment
from blockssl.losses import BarlowTwinsLoss, SimCLRLoss, VICRegLoss
from blockssl.train import pretrain
from tests.conftest import DDP_RUN, assert_same_model, authors_barlow_twins, spawn, tiny_config

LOSSES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "barlow_twins": BarlowTwinsLoss(), "simclr": SimCLRLoss(), "vicreg": VICRegLoss(),
    "barlow_twins_reference": BarlowTwinsLoss(reference_allreduce=True),
}


def _loss_and_grad(name: str, x: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    w = weight.clone().requires_grad_(True)
    z1, z2 = x[0] @ w, x[1] @ w.tanh()
    loss = (authors_barlow_twins(z1, z2, 16) if name == "authors" else LOSSES[name](z1, z2))
    loss.backward()
    return loss.detach(), w.grad


def _loss_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 16, 6, generator=g), torch.randn(6, 5, generator=g)  # two views of a global batch of 16


def _loss_worker(rank: int, world: int, out: str) -> None:
    x, weight = _loss_inputs()
    local = x[:, rank * (x.shape[1] // world): (rank + 1) * (x.shape[1] // world)]
    results = {}
    for name in [*LOSSES, "authors"]:
        loss, grad = _loss_and_grad(name, local, weight)
        dist.all_reduce(grad)
        grad /= world  # what DistributedDataParallel does with parameter gradients
        results[name] = {"loss": loss, "grad": grad}
    torch.save(results, f"{out}.{rank}")


@pytest.fixture(scope="module")
def two_process_losses(tmp_path_factory) -> list[dict[str, dict[str, torch.Tensor]]]:
    """Every loss's value and gradient in each of two processes holding half of the batch (one launch for all)."""
    out = tmp_path_factory.mktemp("losses") / "r"
    spawn(_loss_worker, 2, str(out))
    return [torch.load(f"{out}.{rank}", weights_only=True) for rank in range(2)]


def test_reference_allreduce_is_the_authors_update_at_1_over_world_size(two_process_losses):
    """loss.reference_allreduce reproduces the paper's gradients: those of a raw-all_reduce re-implementation of
    the authors' loss, half (1/world_size) of the exact global-batch gradient, with the same loss value."""
    exact_loss, exact_grad = _loss_and_grad("barlow_twins", *_loss_inputs())
    for result in two_process_losses:
        ours, theirs = result["barlow_twins_reference"], result["authors"]
        torch.testing.assert_close(ours["grad"], theirs["grad"], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(ours["loss"], theirs["loss"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ours["loss"], exact_loss, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ours["grad"], exact_grad / 2, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", ["barlow_twins", "simclr", "vicreg"])
def test_loss_value_and_gradient_match_one_process_with_the_global_batch(two_process_losses, name):
    loss, grad = _loss_and_grad(name, *_loss_inputs())
    for result in two_process_losses:
        torch.testing.assert_close(result[name]["loss"], loss, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(result[name]["grad"], grad, rtol=1e-4, atol=1e-6)


def _train_worker(rank: int, world: int, overrides: list[str], stop_after: int | None, resume: bool) -> None:
    cfg = tiny_config(overrides[0], *overrides[1:])
    pretrain(resume_config(cfg.out) if resume else cfg, resume=resume, stop_after=stop_after)


@pytest.mark.parametrize(("scheme", "extra"), [("simultaneous", []), ("end_to_end", []),
                                               ("simultaneous", ["data.photometric=device", "data.blur=true"])])
def test_two_processes_train_like_one_with_the_global_batch(tmp_path, scheme, extra):
    """With the colour operations on the device too: each process finishes its half of the global batch."""
    single = pretrain(tiny_config(tmp_path / "one", f"train.scheme={scheme}", *DDP_RUN, *extra))
    spawn(_train_worker, 2, [str(tmp_path / "two"), f"train.scheme={scheme}", *DDP_RUN, *extra], None, False)
    assert_same_model(single, tmp_path / "two")


def test_checkpoint_from_two_processes_resumes_in_one(tmp_path):
    run = [*DDP_RUN, "train.epochs=2"]
    single = pretrain(tiny_config(tmp_path / "one", *run))
    spawn(_train_worker, 2, [str(tmp_path / "mixed"), *run], 3, False)  # preempted after 3 of 8 steps
    assert load_checkpoint(tmp_path / "mixed/checkpoints/last.pt")["step"] == 3
    pretrain(resume_config(tmp_path / "mixed"), resume=True)
    assert_same_model(single, tmp_path / "mixed")


def test_checkpoint_from_one_process_resumes_in_two(tmp_path):
    run = [*DDP_RUN, "train.epochs=2"]
    single = pretrain(tiny_config(tmp_path / "one", *run))
    pretrain(tiny_config(tmp_path / "mixed", *run), stop_after=5)
    spawn(_train_worker, 2, [str(tmp_path / "mixed"), *run], None, True)
    assert_same_model(single, tmp_path / "mixed")


def test_misconfigured_launch_fails_loudly(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(RuntimeError, match="MASTER_ADDR"):
        init_from_environment()


def _features_worker(rank: int, world: int, run: str, out: str) -> None:
    from blockssl.eval.probe import extract_features, topk_accuracy
    from blockssl.runtime import checkpoint_model

    model, cfg, _ = checkpoint_model(run)
    feats, labels = extract_features(model, _test_set(cfg), batch_size=8)
    torch.save({"feats": feats, "labels": labels, "top1": topk_accuracy(feats[-1][:, :10], labels, (1,))},
               f"{out}.{rank}")


def _test_set(cfg):
    from blockssl.data.datasets import build_dataset, dataset_info
    from blockssl.data.transforms import eval_transform
    from blockssl.eval.probe import Transformed

    return Transformed(build_dataset(cfg.data, "test"), eval_transform(dataset_info(cfg.data)))


def test_sharded_evaluation_counts_every_image_once(tmp_path):
    run = pretrain(tiny_config(tmp_path / "run", "train.epochs=1", "data.synthetic_size=132"))  # 33 test images
    _features_worker(0, 1, str(run), str(tmp_path / "single"))
    spawn(_features_worker, 2, str(run), str(tmp_path / "sharded"))
    single = torch.load(tmp_path / "single.0", weights_only=True)
    assert len(single["labels"]) == 33
    for rank in range(2):
        sharded = torch.load(tmp_path / f"sharded.{rank}", weights_only=True)
        assert torch.equal(sharded["labels"], single["labels"])  # same images, same order, none twice
        for a, b in zip(sharded["feats"], single["feats"], strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
        assert sharded["top1"] == single["top1"]


def _corruption_worker(rank: int, world: int, root: str, images, out: str, node_local: bool = False) -> None:
    from blockssl.eval.robustness import CorruptionCache

    folder = Path(root) / str(rank) if node_local else Path(root)  # node_local: each process its own cache
    cache = CorruptionCache(folder, "synthetic", images, np.zeros(len(images), dtype=np.int64), seed=0)
    torch.save(torch.from_numpy(cache.get("shot_noise", 3)), f"{out}.{rank}")


def test_corruptions_generated_in_shares_equal_one_process(tmp_path):
    """Two processes corrupt every other image each; rank 0 writes the cache, and both hold the whole set."""
    images = np.random.default_rng(0).integers(0, 256, (5, 32, 32), dtype=np.uint8)
    _corruption_worker(0, 1, str(tmp_path / "single"), images, str(tmp_path / "single"))
    spawn(_corruption_worker, 2, str(tmp_path / "shared"), images, str(tmp_path / "shared"))
    single = torch.load(tmp_path / "single.0", weights_only=True)
    for rank in range(2):
        assert torch.equal(torch.load(tmp_path / f"shared.{rank}", weights_only=True), single)
    assert len(list((tmp_path / "shared").rglob("*.npz"))) == 1
    # A cache on one node only: the processes regenerate together instead of one waiting alone in the gather.
    shutil.copytree(tmp_path / "single", tmp_path / "local" / "0")
    spawn(_corruption_worker, 2, str(tmp_path / "local"), images, str(tmp_path / "local"), True)
    for rank in range(2):
        assert torch.equal(torch.load(tmp_path / f"local.{rank}", weights_only=True), single)


def _paper_probe_worker(rank: int, world: int, run: str, out: str) -> None:
    from blockssl.eval.probe import run_probe

    results = run_probe(run, ["probe.protocol=paper", "probe.epochs=2", "probe.batch_size=16"])
    torch.save(results, f"{out}.{rank}")


def test_paper_probe_under_two_processes_counts_the_test_set_exactly(tmp_path):
    """Each process trains on half of every batch with averaged gradients: both end with the same probes, hence the
    same accuracies, computed from exact counts over the 33 test images (none padded in or dropped)."""
    run = pretrain(tiny_config(tmp_path / "run", "train.epochs=1", "data.synthetic_size=132"))
    spawn(_paper_probe_worker, 2, str(run), str(tmp_path / "res"))
    results = [torch.load(tmp_path / f"res.{rank}", weights_only=False) for rank in range(2)]
    assert results[0] == results[1]
    blocks = results[0]["run"]["blocks"]
    assert results[0]["run"]["test_images"] == 33 and len(blocks) == 5
    for r in blocks.values():
        for accuracy in (*r["curve_top1"], r["top5"]):
            assert accuracy * 33 / 100 == pytest.approx(round(accuracy * 33 / 100), abs=1e-6)
