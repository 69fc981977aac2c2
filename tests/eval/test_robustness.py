"""Corruption robustness: every corruption on small images, mCE arithmetic, errors that grow with severity on a
trained model, a reused cache, the ImageNet-C folder source, tidy CSV and the CLI."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from blockssl.checkpoint import CheckpointError
from blockssl.cli import main
from blockssl.config import ConfigError, DataConfig, load_config, resume_config
from blockssl.data.datasets import build_dataset, dataset_info
from blockssl.data.transforms import eval_transform, pregenerated_transform
from blockssl.eval import robustness as rob
from blockssl.eval.probe import run_probe
from blockssl.eval.robustness import (
    CORRUPTIONS,
    corrupt_images,
    corruption_errors,
    mean_ce,
    mean_corruption_error,
    relative_corruption_errors,
    run_robustness,
    summarize,
)
from blockssl.runtime import checkpoint_model
from blockssl.train import pretrain
from tests.conftest import tiny_config

BLOCKS = ["block1", "block2", "block3", "block4", "concat"]
PICK = ["robustness.corruptions=[gaussian_noise,contrast,pixelate]"]


@pytest.fixture(scope="module")
def probed_run(tmp_path_factory) -> Path:
    """A run trained briefly on 512 synthetic shape images (128 test images), with its probes."""
    root = tmp_path_factory.mktemp("robustness")
    run = pretrain(tiny_config(root / "run", "data.synthetic_size=512", "train.epochs=2", "data.image_size=32"))
    run_probe(run, ["probe.epochs=10", "probe.batch_size=32"])
    return run


def _images(n: int, size: int, gray: bool) -> np.ndarray:
    """Smooth structured images (gradients and a bright square), so that blurs and noise visibly change them."""
    y, x = np.mgrid[0:size, 0:size] / size
    out = []
    for i in range(n):
        base = 60 + 120 * (x * (i + 1) % 1.0) * y
        base[size // 4: size // 2, size // 4: size // 2] = 230
        rgb = np.stack([base, base[::-1], base.T], axis=-1)
        out.append(base if gray else rgb)
    return np.clip(np.stack(out), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("corruption", CORRUPTIONS)
def test_every_corruption_runs_at_every_severity_on_small_rgb_and_grayscale(corruption):
    for images in (_images(2, 32, gray=False), _images(2, 28, gray=True)):
        for severity in range(1, 6):
            out = corrupt_images(images, corruption, severity, seed=0)
            assert out.shape == images.shape and out.dtype == np.uint8
            assert not np.array_equal(out, images), (corruption, severity, images.shape)
            # Reproducible from the seed, also for impulse_noise and glass_blur, which ignore np.random's state.
            np.testing.assert_array_equal(out, corrupt_images(images, corruption, severity, seed=0))


def test_corruptions_leave_numpys_global_rng_alone():
    np.random.seed(123)
    expected = np.random.rand()
    np.random.seed(123)
    corrupt_images(_images(1, 32, gray=False), "gaussian_noise", 3, seed=0)
    assert np.random.rand() == expected


def test_seeds_change_the_noise_and_severities_order_its_strength():
    images = _images(4, 32, gray=False)
    a, b = (corrupt_images(images, "gaussian_noise", 3, seed=s) for s in (0, 1))
    assert not np.array_equal(a, b)
    deviation = [np.abs(corrupt_images(images, "gaussian_noise", s, 0).astype(float) - images).mean() for s in (1, 5)]
    assert deviation[1] > 2 * deviation[0]


@pytest.mark.parametrize("corruption", ["gaussian_noise", "glass_blur"])
def test_any_share_of_the_images_is_corrupted_as_in_the_whole_set(corruption):
    """Per-image seeds: processes that corrupt every other image reproduce the single-process set exactly."""
    images = _images(5, 32, gray=True)
    whole = corrupt_images(images, corruption, 2, seed=0)
    for start in (0, 1):
        share = range(start, 5, 2)
        np.testing.assert_array_equal(corrupt_images(images[start::2], corruption, 2, seed=0, indices=share),
                                      whole[start::2])


def test_mce_and_relative_mce_by_hand():
    errors = {"fog": {1: 20.0, 2: 40.0}, "snow": {1: 30.0, 2: 50.0}}
    base = {"fog": {1: 40.0, 2: 60.0}, "snow": {1: 30.0, 2: 70.0}}
    ce = corruption_errors(errors, base)  # fog: 60 / 100, snow: 80 / 100
    assert ce == pytest.approx({"fog": 60.0, "snow": 80.0})
    assert mean_ce(ce) == pytest.approx(70.0)
    rel = relative_corruption_errors(errors, 10.0, base, 20.0)  # fog: (10+30)/(20+40), snow: (20+40)/(10+50)
    assert rel == pytest.approx({"fog": 100 * 40 / 60, "snow": 100.0})
    assert mean_ce(rel) == pytest.approx((100 * 40 / 60 + 100) / 2)
    assert mean_corruption_error(errors) == pytest.approx(35.0)
    # A baseline whose error does not rise under a corruption leaves its relative CE undefined, not infinite.
    assert math.isnan(relative_corruption_errors(errors, 10.0, {"fog": {1: 5.0, 2: 5.0}, "snow": base["snow"]},
                                                 5.0)["fog"])
    out = summarize({"b": errors}, {"b": 10.0}, {"b": base}, {"b": 20.0})["b"]
    assert out["mce"] == pytest.approx(70.0) and out["mean_corruption_error"] == pytest.approx(35.0)


def test_errors_grow_with_severity_and_the_tidy_csv(probed_run):
    results = run_robustness(probed_run, PICK)
    saved = json.loads((probed_run / "robustness.json").read_text())
    assert saved == results and list(results["blocks"]) == BLOCKS
    assert results["baseline"] is None and results["settings"]["images"] == 128
    noise = results["blocks"]["concat"]["errors"]["gaussian_noise"]
    clean = results["blocks"]["concat"]["clean_error"]
    assert clean < 90 - 5, "the probe should be well above chance (90% error) on clean images"
    assert noise["5"] > noise["1"] + 5 and noise["5"] > clean + 5
    for r in results["blocks"].values():
        assert "mce" not in r and r["mean_corruption_error"] == pytest.approx(
            np.mean([e for per in r["errors"].values() for e in per.values()]))

    with open(probed_run / "robustness.csv") as f:
        rows = list(csv.DictReader(f))
    keys = [(r["block"], r["corruption"], int(r["severity"])) for r in rows]
    assert len(keys) == len(set(keys)) == 5 * 3 * 5
    assert set(keys) == {(b, c, s) for b in BLOCKS for c in ("gaussian_noise", "contrast", "pixelate")
                         for s in range(1, 6)}
    for r in rows:
        block = results["blocks"][r["block"]]
        assert float(r["top1_error"]) == pytest.approx(block["errors"][r["corruption"]][r["severity"]], abs=1e-3)
        assert float(r["clean_error"]) == pytest.approx(block["clean_error"], abs=1e-3)
        assert float(r["error_increase"]) == pytest.approx(float(r["top1_error"]) - float(r["clean_error"]), abs=1e-3)


def test_cached_corruptions_are_reused(probed_run, monkeypatch):
    first = run_robustness(probed_run, [*PICK, "robustness.severities=[1,5]"])
    cached = sorted((probed_run.parent / ".corruption-cache").glob("synthetic-128-0-*/*/*.npz"))
    assert {(p.parent.name, p.name) for p in cached} >= {(c, f"{s}.npz") for c in ("gaussian_noise", "contrast")
                                                         for s in (1, 5)}

    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError("corruptions were generated again instead of read from the cache")

    monkeypatch.setattr(rob, "corrupt_images", fail)
    assert run_robustness(probed_run, [*PICK, "robustness.severities=[1,5]"])["blocks"] == first["blocks"]


def test_a_run_against_itself_as_baseline_scores_100(probed_run):
    results = run_robustness(probed_run, [*PICK, "robustness.severities=[1,5]"], baseline=probed_run)
    assert results["baseline"]["run"] == str(probed_run)
    for r in results["blocks"].values():
        assert r["mce"] == pytest.approx(100.0)
        assert all(v is None or v == pytest.approx(100.0) for v in r["relative_ce"].values())
    with open(probed_run / "robustness.csv") as f:
        row = next(csv.DictReader(f))
    assert row["baseline_top1_error"] == row["top1_error"]
    with pytest.raises(ConfigError, match="no block9"):
        run_robustness(probed_run, [*PICK, "robustness.severities=[1]", "robustness.baseline_block=block9"],
                       baseline=probed_run)


def test_imagenet_c_folder_source_matches_generated_images(probed_run, tmp_path):
    """A folder <root>/<corruption>/<severity>/<class>/<image> holding the generated images gives the same errors."""
    settings = ["robustness.corruptions=[gaussian_noise,contrast]", "robustness.severities=[2,4]"]
    generated = run_robustness(probed_run, settings)
    for cache in (probed_run.parent / ".corruption-cache").glob("synthetic-128-0-*/*/*.npz"):
        corruption, severity = cache.parent.name, cache.stem
        if corruption in ("gaussian_noise", "contrast") and severity in ("2", "4"):
            with np.load(cache) as saved:
                for i, (image, label) in enumerate(zip(saved["images"], saved["labels"], strict=True)):
                    folder = tmp_path / "imagenet-c" / corruption / severity / f"class{label}"
                    folder.mkdir(parents=True, exist_ok=True)
                    Image.fromarray(image).save(folder / f"{i:04d}.png")
    from_folder = run_robustness(probed_run, [*settings, "robustness.source=folder",
                                              f"robustness.root={tmp_path / 'imagenet-c'}"])
    assert from_folder["settings"]["source"] == "folder"
    for name in BLOCKS:
        assert from_folder["blocks"][name]["errors"] == generated["blocks"][name]["errors"]

    with pytest.raises(FileNotFoundError, match="frost"):
        run_robustness(probed_run, ["robustness.corruptions=[frost]", "robustness.source=folder",
                                    f"robustness.root={tmp_path / 'imagenet-c'}"])
    one_class = tmp_path / "one-class" / "fog" / "1" / "class0"
    one_class.mkdir(parents=True)
    Image.new("RGB", (32, 32)).save(one_class / "0.png")
    with pytest.raises(ConfigError, match="class folders"):
        run_robustness(probed_run, ["robustness.corruptions=[fog]", "robustness.severities=[1]",
                                    "robustness.source=folder", f"robustness.root={tmp_path / 'one-class'}"])


def test_max_images_takes_a_seeded_subset(probed_run):
    results = run_robustness(probed_run, ["robustness.corruptions=[fog]", "robustness.severities=[3]",
                                          "robustness.max_images=40"])
    assert results["settings"]["images"] == results["settings"]["clean_images"] == 40
    subset = rob._subset_indices(128, 40, 0)
    assert len(set(subset)) == 40 and subset == sorted(subset) and subset != list(range(40))
    assert rob._subset_indices(128, 40, 1) != subset  # the seed picks the images


def test_bad_settings_and_missing_probes_are_clear_errors(probed_run, tmp_path):
    with pytest.raises(ConfigError, match="severities"):
        run_robustness(probed_run, ["robustness.severities=[0,6]"])
    with pytest.raises(ConfigError, match="only robustness"):
        run_robustness(probed_run, ["train.epochs=3"])
    with pytest.raises(ConfigError, match="did you mean 'fog'"):
        run_robustness(probed_run, ["robustness.corruptions=[fgo]"])
    unprobed = pretrain(tiny_config(tmp_path / "unprobed", "train.epochs=1"))
    with pytest.raises(CheckpointError, match=r"has no probes\.pt: run `blockssl probe"):
        run_robustness(unprobed, PICK)
    # Probes of an earlier checkpoint would read features they were not trained on.
    stopped = pretrain(tiny_config(tmp_path / "stopped", "train.epochs=2"), stop_after=4)
    run_probe(stopped, ["probe.epochs=1", "probe.batch_size=16", "probe.lrs=[0.1]", "probe.label_fractions=[]"])
    pretrain(resume_config(stopped), resume=True)
    with pytest.raises(CheckpointError, match="trained on the checkpoint of step 4, the run's last checkpoint is "
                                              "step 8"):
        run_robustness(stopped, PICK)


def test_cli_prints_the_table(probed_run, capsys):
    assert main(["robustness", str(probed_run), "robustness.corruptions=[gaussian_noise]",
                 "robustness.severities=[1]"]) == 0
    out = capsys.readouterr().out
    assert "mean c." in out and "gaussian_noise" in out and "concat" in out
    assert main(["robustness", str(probed_run), "robustness.severities=[7]"]) == 2
    assert "robustness.severities" in capsys.readouterr().err


def test_a_pregenerated_224px_image_reaches_the_model_only_normalised():
    """ImageNet-C images were made from Resize 256 + CenterCrop 224: resizing them again would zoom them 1.14x."""
    info = dataset_info(DataConfig(name="imagefolder"))
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (224, 224, 3), dtype=np.uint8))
    mean, std = torch.tensor(info.mean)[:, None, None], torch.tensor(info.std)[:, None, None]
    expected = (torch.from_numpy(np.array(image)).permute(2, 0, 1) / 255 - mean) / std
    torch.testing.assert_close(pregenerated_transform(info)(image), expected, rtol=0, atol=1e-6)
    assert not torch.allclose(eval_transform(info)(image), expected, atol=1e-2)  # the clean images' framing


def test_folder_source_feeds_corrupted_images_through_the_normalise_only_transform(probed_run, tmp_path,
                                                                                   monkeypatch):
    folder = tmp_path / "imagenet-c" / "fog" / "1"
    cfg = checkpoint_model(probed_run)[1]
    for i, (image, label) in enumerate(build_dataset(cfg.data, "test")):
        (folder / f"class{label}").mkdir(parents=True, exist_ok=True)
        image.save(folder / f"class{label}" / f"{i:04d}.png")
    seen = []
    real = rob.probe_errors

    def spy(model, probes, dataset, *args):
        seen.append(dataset.transform)
        return real(model, probes, dataset, *args)

    monkeypatch.setattr(rob, "probe_errors", spy)
    run_robustness(probed_run, ["robustness.corruptions=[fog]", "robustness.severities=[1]",
                                "robustness.source=folder", f"robustness.root={tmp_path / 'imagenet-c'}"])
    clean, corrupted = seen
    assert "Resize" in repr(clean) and "Resize" not in repr(corrupted) and "Normalize" in repr(corrupted)


def test_alexnet_normaliser_scores_alexnet_100_and_needs_imagenet_c(probed_run):
    cfg = load_config(None, ["robustness.source=folder", "robustness.root=unused"])
    base, base_clean = rob._alexnet_normaliser(cfg, ["block1"])
    own = {c: dict.fromkeys(rob.SEVERITIES, e) for c, e in rob.ALEXNET_ERRORS.items()}
    scores = rob.summarize({"block1": own}, {"block1": rob.ALEXNET_CLEAN_ERROR}, base, base_clean)
    assert scores["block1"]["mce"] == pytest.approx(100) and scores["block1"]["relative_mce"] == pytest.approx(100)
    half = {c: {s: e / 2 for s, e in per.items()} for c, per in own.items()}
    assert rob.summarize({"block1": half}, {"block1": 0.0}, base, base_clean)["block1"]["mce"] == (
        pytest.approx(50))
    with pytest.raises(ConfigError, match="severities"):
        rob._alexnet_normaliser(load_config(None, ["robustness.source=folder", "robustness.severities=[1,2]"]),
                                ["block1"])
    with pytest.raises(ConfigError, match="imagefolder"):  # a Fashion-MNIST run, refused before any evaluation
        run_robustness(probed_run, baseline="alexnet")
