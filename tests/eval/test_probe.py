"""Linear probes: far above chance on learnable data, better than random init, and the backbone untouched."""

from __future__ import annotations

import json
import math

import pytest
import torch

from blockssl.config import ConfigError, ProbeConfig
from blockssl.eval.probe import (
    assert_unchanged,
    fit_logistic,
    knn_predict,
    pixel_probe,
    raw_probe,
    run_probe,
    select_linear_probes,
    topk_accuracy,
    train_linear_probes,
)
from blockssl.train import pretrain
from tests.conftest import tiny_config


def test_probe_reads_every_block_both_ways_and_writes_probe_json(tmp_path):
    run = pretrain(tiny_config(tmp_path / "run", "data.synthetic_size=512", "train.epochs=1"))
    results = run_probe(run, ["probe.weight_decays=[1e-4,1e-2,1]"], random_init=True, pixels=True)
    assert json.loads((run / "probe.json").read_text()) == results
    r = results["run"]
    assert (r["protocol"], r["solver"], r["scored_on"]) == ("fast", "lbfgs", "test")
    assert list(r["blocks"]) == list(r["pooled"]) == ["block1", "block2", "block3", "block4", "concat"]
    assert r["train_images"] + r["val_images"] == 512
    for b in [*r["blocks"].values(), *r["pooled"].values()]:
        assert b["weight_decay"] in (1e-4, 1e-2, 1.0) and 0 <= b["top1"] <= b["top5"] <= 100
        assert set(b["grid_val_top1"]) == {"1", "0.01", "0.0001"} and b["val_top1"] == max(b["grid_val_top1"].values())
        assert b["on_grid_edge"] == (b["weight_decay"] != 1e-2)
        assert {"knn20_top1", "knn200_top1", "labels1pct_top1", "labels10pct_top1"} <= b.keys()
    # Early-block features of 10 shape classes are far above the 10% of chance after one epoch.
    assert r["blocks"]["block1"]["top1"] > 25 and r["blocks"]["concat"]["top1"] > 25
    assert set(results["random_init"]["blocks"]) == set(results["random_init"]["pooled"]) == set(r["blocks"])
    assert list(results["pixels"]["blocks"]) == ["pixels"]


def test_a_probe_written_elsewhere_leaves_the_run_as_it_is(tmp_path):
    run = pretrain(tiny_config(tmp_path / "run", "train.epochs=1"))
    cheap = ["probe.readouts=[head]", "probe.label_fractions=[]", "probe.knn_k=[5]"]
    own = run_probe(run, [*cheap, "probe.weight_decays=[1e-2]"], progress=False)
    before = {p.name: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    other = run_probe(run, [*cheap, "probe.weight_decays=[1e-4,1]"], progress=False, out=tmp_path / "other")
    assert {p.name: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before  # results, probes, logs
    assert json.loads((tmp_path / "other" / "probe.json").read_text()) == other != own
    assert {b["weight_decay"] for b in other["run"]["blocks"].values()} <= {1e-4, 1.0}
    assert (tmp_path / "other" / "probes.pt").is_file()


def test_the_sgd_solver_chooses_its_lr_and_reports_the_final_and_best_epochs(tmp_path):
    run = pretrain(tiny_config(tmp_path / "run", "data.synthetic_size=512", "train.epochs=1"))
    results = run_probe(run, ["probe.solver=sgd", "probe.epochs=20", "probe.batch_size=32", "probe.lrs=[0.03,0.1]",
                              "probe.readouts=[head]", "probe.label_fractions=[]"])
    assert "pooled" not in results["run"] and results["run"]["epochs"] == 20
    for r in results["run"]["blocks"].values():
        assert r["lr"] in (0.03, 0.1) and r["on_grid_edge"] and 0 <= r["top1"] <= r["top5"] <= 100
        # The final epoch is what top1 reports; the best epoch (optimistic: chosen on the test set) is beside it.
        assert len(r["curve_top1"]) == 20 and r["curve_top1"][-1] == r["top1"]
        assert r["best_top1"] == max(r["curve_top1"]) == r["curve_top1"][r["best_epoch"] - 1] >= r["top1"]


def test_logistic_regression_reaches_the_penalised_optimum_from_any_start():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 6, generator=g) * 3 + 1
    y = (x[:, 0] + 0.5 * torch.randn(300, generator=g) > 1).long() + (x[:, 1] > 1).long()
    probe, iterations = fit_logistic(x, y, 3, weight_decay=1e-2, max_iter=500)
    assert iterations < 500
    # First-order optimality of mean cross-entropy + wd/2 |W|^2 (bias unpenalised), on the standardised features.
    w = probe.linear.weight.detach().requires_grad_()
    b = probe.linear.bias.detach().requires_grad_()
    z = (x - x.mean(0)) / (x.std(0) + 1e-6)
    loss = torch.nn.functional.cross_entropy(z @ w.T + b, y) + 0.5 * 1e-2 * w.square().sum()
    gw, gb = torch.autograd.grad(loss, (w, b))
    assert gw.abs().max() < 1e-4 and gb.abs().max() < 1e-4
    # Warm-started from another penalty's solution (as along the grid), it reaches the same optimum.
    other, _ = fit_logistic(x, y, 3, weight_decay=1.0, max_iter=500)
    warm, _ = fit_logistic(x, y, 3, weight_decay=1e-2, max_iter=500, init=other)
    torch.testing.assert_close(warm.linear.weight, probe.linear.weight, atol=1e-3, rtol=0)
    assert torch.equal(other.mean, probe.mean) and torch.equal(warm.std, probe.std)


def test_the_penalty_is_chosen_on_held_out_images_and_a_choice_on_the_edge_is_flagged():
    g = torch.Generator().manual_seed(0)
    signal = torch.randn(400, 2, generator=g)
    labels = (signal[:, 0] > 0).long()
    noisy = torch.cat([signal, torch.randn(400, 60, generator=g)], dim=1)  # 60 noise features: overfits unpenalised
    fit, val = noisy[:100], noisy[100:]
    cfg = ProbeConfig(weight_decays=[1e-6, 1e-2, 1e4])
    ((_, choice),) = select_linear_probes([fit], labels[:100], ([val], labels[100:]), 2, cfg, seed=0)
    assert choice["weight_decay"] == 1e-2 and not choice["on_grid_edge"]
    assert choice["grid_val_top1"]["0.01"] > max(choice["grid_val_top1"]["1e-06"], choice["grid_val_top1"]["10000"])
    ((_, edge),) = select_linear_probes([fit], labels[:100], ([val], labels[100:]), 2,
                                        ProbeConfig(weight_decays=[1e-2, 1e4]), seed=0)
    assert edge["weight_decay"] == 1e-2 and edge["on_grid_edge"]


def test_the_pool_readout_is_the_global_average_of_each_block_output(tmp_path):
    from blockssl.method import build_model

    model = build_model(tiny_config(tmp_path), 3, 32).eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        readouts = model.readouts(x, ("head", "pool"))
        h = x
        for k, block in enumerate(model.blocks):
            h = block(h)
            torch.testing.assert_close(readouts["pool"][k], h.mean(dim=(2, 3)))
            torch.testing.assert_close(readouts["head"][k], model.heads[k](h))
    with pytest.raises(ValueError, match="unknown readouts"):
        model.readouts(x, ("cls",))


def test_topk_accuracy_by_hand():
    logits = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.3], [0.2, 0.3, 0.5]])
    labels = torch.tensor([1, 2, 0])
    assert topk_accuracy(logits, labels, (1, 2)) == pytest.approx({"top1": 100 / 3, "top2": 200 / 3})


def test_changed_weights_are_detected():
    model = torch.nn.Linear(2, 2)
    snapshot = {k: v.clone() for k, v in model.state_dict().items()}
    assert_unchanged(model, snapshot)
    with torch.no_grad():
        model.weight[0, 0] += 1e-6
    with pytest.raises(AssertionError, match="weight"):
        assert_unchanged(model, snapshot)


def test_knn_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    train, labels, query = torch.randn(50, 8, generator=g), torch.randint(0, 4, (50,), generator=g), torch.randn(
        7, 8, generator=g)
    scores = knn_predict(train, labels, query, k=5, num_classes=4, temperature=0.07, chunk=3)
    for q in range(7):
        sims = [float(torch.nn.functional.cosine_similarity(query[q], t, dim=0)) for t in train]
        nearest = sorted(range(50), key=lambda i: -sims[i])[:5]
        expected = torch.zeros(4)
        for i in nearest:
            expected[labels[i]] += math.exp(sims[i] / 0.07)
        torch.testing.assert_close(scores[q], expected, rtol=1e-4, atol=0)


def test_label_subsets_are_stratified_and_seeded():
    from blockssl.eval.probe import label_subset

    labels = torch.arange(1000) % 4
    candidates = torch.arange(0, 1000, 2)  # the images the probe may train on (labels 0 and 2 only)
    subset = label_subset(None, candidates, labels, 0.1, "", seed=0)  # type: ignore[arg-type]
    assert set(subset.tolist()) <= set(candidates.tolist())
    assert torch.bincount(labels[subset], minlength=4).tolist() == [25, 0, 25, 0]
    assert torch.equal(subset, label_subset(None, candidates, labels, 0.1, "", seed=0))  # type: ignore[arg-type]
    assert not torch.equal(subset, label_subset(None, candidates, labels, 0.1, "", seed=1))  # type: ignore[arg-type]
    tiny = label_subset(None, candidates, labels, 0.001, "", seed=0)  # type: ignore[arg-type]
    assert torch.bincount(labels[tiny], minlength=4).tolist() == [1, 0, 1, 0]  # at least one per class


def test_paper_protocol_trains_every_block_on_augmented_images(tmp_path):
    run = pretrain(tiny_config(tmp_path / "run", "data.synthetic_size=512", "train.epochs=1"))
    # Raw features (no standardisation, as the reference) of a tiny model are small: a larger lr than ImageNet's 0.1.
    results = run_probe(run, ["probe.protocol=paper", "probe.epochs=8", "probe.batch_size=32", "probe.lr=1.0"])
    r = results["run"]
    assert (r["protocol"], r["epochs"], r["train_images"]) == ("paper", 8, 512)
    assert list(r["blocks"]) == ["block1", "block2", "block3", "block4", "concat"]
    for b in r["blocks"].values():
        assert b["lr"] == 1.0 and 0 <= b["top1"] <= b["top5"] <= 100
        assert len(b["curve_top1"]) == 8 and b["curve_top1"][-1] == b["top1"] and b["best_top1"] >= b["top1"]
        assert "knn20_top1" not in b  # kNN and label fractions belong to the fast protocol
    assert r["blocks"]["concat"]["top1"] > 20  # 10 shape classes: chance is 10%
    saved = torch.load(run / "probes.pt", weights_only=True)
    assert set(saved["probes"]) == set(r["blocks"])
    for probe in saved["probes"].values():  # raw features: the standardisation buffers are the identity
        assert torch.equal(probe["mean"], torch.zeros_like(probe["mean"]))
        assert torch.equal(probe["std"], torch.ones_like(probe["std"]))


@pytest.mark.parametrize("standardize", [True, False])
def test_fast_protocol_standardises_features_only_when_asked(standardize):
    feats = [torch.randn(64, 8) * 5 + 3]
    labels = torch.arange(64) % 4
    cfg = ProbeConfig(epochs=1, batch_size=32, standardize=standardize)
    (probe,) = train_linear_probes(feats, labels, 4, cfg, lr=0.1, seed=0)
    if standardize:
        torch.testing.assert_close(probe.mean, feats[0].mean(0))
        torch.testing.assert_close(probe.std, feats[0].std(0) + 1e-6)
    else:
        assert torch.equal(probe.mean, torch.zeros(8)) and torch.equal(probe.std, torch.ones(8))


def test_raw_probe_starts_as_the_reference_classifier():
    torch.manual_seed(0)
    probe = raw_probe(4096, 10)
    assert probe.linear.weight.std().item() == pytest.approx(0.01, rel=0.02)
    assert torch.equal(probe.linear.bias, torch.zeros(10))
    x = torch.randn(3, 4096)
    torch.testing.assert_close(probe(x), probe.linear(x))  # no standardisation


def test_paper_protocol_refuses_a_batch_larger_than_the_data(tmp_path):
    run = pretrain(tiny_config(tmp_path / "run", "train.epochs=1"))
    with pytest.raises(ConfigError, match="larger than the 64 training images"):
        run_probe(run, ["probe.protocol=paper", "probe.epochs=1"])


def test_the_raw_pixel_probe_reads_flattened_images_and_follows_the_fast_protocol_only(tmp_path):
    cfg = tiny_config(tmp_path, "probe.epochs=3", "probe.label_fractions=[]")
    result = pixel_probe(cfg)["blocks"]
    assert list(result) == ["pixels"] and 0 <= result["pixels"]["top1"] <= 100 and "knn20_top1" in result["pixels"]
    cfg.probe.protocol = "paper"
    with pytest.raises(ConfigError, match="fast protocol only"):
        pixel_probe(cfg)


def test_a_plain_pooling_head_is_probed_once_and_reported_under_both_readouts(tmp_path, monkeypatch):
    import blockssl.eval.probe as probe_module

    run = pretrain(tiny_config(tmp_path / "run", "train.scheme=end_to_end", "model.head=gap", "noise.type=none",
                               "data.synthetic_size=128", "train.epochs=1"))
    probed: list[list[str]] = []
    protocol = probe_module.fast_protocol
    monkeypatch.setattr(probe_module, "fast_protocol", lambda *a, **k: probed.append(a[4]) or protocol(*a, **k))
    r = run_probe(run, ["probe.weight_decays=[1e-4,1e-2]"])["run"]
    assert probed == [["block1", "block2", "block3", "block4", "concat"]]  # every head is plain pooling: once
    assert r["pooled"] == r["blocks"]

    probed.clear()
    blockwise = pretrain(tiny_config(tmp_path / "blockwise", "data.synthetic_size=128", "train.epochs=1"))
    run_probe(blockwise, ["probe.weight_decays=[1e-4,1e-2]"])
    assert probed[1] == ["block1", "block2", "block3", "block4", "concat"]  # CbE heads: pooled probed apart
