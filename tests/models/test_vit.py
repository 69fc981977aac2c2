"""timm Vision Transformers through the backbone protocol: the model computes timm's forward, its stages are timm's
blocks (the embedding with the first, the norm with the last), token heads read the class token or the patch
tokens, lean = reference = pipeline execution bit for bit (stochastic depth included), a run resumes exactly, is
probed and exports a state dict that ``timm.create_model`` loads."""

from __future__ import annotations

import json
import signal

import pytest
import timm
import torch

from blockssl.checkpoint import load_checkpoint
from blockssl.config import ConfigError, resume_config
from blockssl.eval.probe import run_probe
from blockssl.execution import build_optimizers
from blockssl.export import export_run, loads_into
from blockssl.memory import model_accounting
from blockssl.method import build_model
from blockssl.models.backbone import BackboneOptions, equal_runs, stage_names
from blockssl.models.heads import Head
from blockssl.models.vit import library_state_dict
from blockssl.report import write_report
from blockssl.study.depth import block_names, depth_names
from blockssl.study.driver import run_study
from blockssl.study.spec import load_study
from blockssl.train import pretrain
from tests.conftest import TINY, assert_same_tensors, run_metrics, spawn, tiny_config
from tests.test_faults import KILL_RUN, _start, _wait_for_step
from tests.test_method import _run_steps, assert_lean_equals_reference
from tests.test_pipeline import RUN, _worker, assert_same_run
from tests.test_study import EVAL, _write_study

# 16 px images in 4 x 4 patches: 16 patch tokens and the class token, 16 channels, 4 transformer blocks.
VIT = ["model.arch=vit_tiny_patch16_224", "model.width=1", "model.patch_size=4", "model.depth=4", "model.embed_dim=16",
       "model.num_heads=2", "train.optimizer=adamw", "train.lr=1e-3", "train.weight_decay=0.05"]
TIMM_ARGS = {"num_classes": 0, "img_size": 16, "in_chans": 3, "patch_size": 4, "depth": 4, "embed_dim": 16,
             "num_heads": 2}


def _vit(tmp_path, *overrides: str):
    cfg = tiny_config(tmp_path, *VIT, *overrides)
    torch.manual_seed(0)
    return build_model(cfg, 3, 16), cfg


def test_the_backbone_is_timms_vit_cut_at_its_blocks(tmp_path):
    model, cfg = _vit(tmp_path)
    assert cfg.model.blocks == "0,1,2,3"  # auto: one transformer block per block at depth 4
    reference = timm.create_model("vit_tiny_patch16_224", **TIMM_ARGS).eval()
    reference.load_state_dict(library_state_dict(model.backbone.state_dict()))  # strict: timm's names, all of them
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(model.backbone.eval()(x), reference.forward_features(x), rtol=0, atol=0)
    # the embedding trains with the first block, the final norm with the last
    first, last = ({id(p) for p in block.parameters()} for block in (model.blocks[0], model.blocks[-1]))
    assert {id(p) for p in model.backbone.embed.parameters()} <= first
    assert {id(p) for p in model.backbone.norm.parameters()} <= last
    owned = set().union(*({id(p) for p in block.parameters()} for block in model.blocks))
    assert owned == {id(p) for p in model.backbone.parameters()}
    assert stage_names("vit_small_patch16_224") == tuple(str(i) for i in range(12))
    assert equal_runs(stage_names("vit_small_patch16_224")) == "0-2,3-5,6-8,9-11"
    assert tiny_config(tmp_path, *VIT, "model.depth=0").model.blocks == "0-2,3-5,6-8,9-11"


def test_blocks_group_transformer_blocks_by_runs_and_names(tmp_path):
    model, _ = _vit(tmp_path, "model.blocks=0-1,2+3")
    assert model.block_stages == [["0", "1"], ["2", "3"]]
    with pytest.raises(ConfigError, match=r"each stage of 0\+1\+2\+3 exactly once"):
        tiny_config(tmp_path, *VIT, "model.blocks=0-2,2-3")
    with pytest.raises(ConfigError, match=r"model.patch_size=4: not read by model.arch=resnet18"):
        tiny_config(tmp_path, "model.patch_size=4")
    with pytest.raises(ConfigError, match=r"model.width=0.5: not read by model.arch=vit_tiny_patch16_224"):
        tiny_config(tmp_path, *VIT, "model.width=0.5")
    with pytest.raises(ConfigError, match=r"model.token_pool=mean: not read by model.arch=resnet18"):
        tiny_config(tmp_path, "model.token_pool=mean")
    with pytest.raises(ConfigError, match=r"model.granularity=unit: not read by model.arch=vit_tiny_patch16_224"):
        tiny_config(tmp_path, *VIT, "model.granularity=unit")
    with pytest.raises(ConfigError, match="this backbone has none"):  # a ViT without a class token
        build_model(tiny_config(tmp_path, *VIT, "model.token_pool=cls", "model.arch=vit_medium_patch16_gap_256"),
                    3, 16)
    with pytest.raises(ConfigError, match="timm cannot build it"):
        tiny_config(tmp_path, *VIT, "model.embed_dim=15")  # not divisible by 2 heads
    with pytest.raises(ConfigError, match="not a plain VisionTransformer"):
        tiny_config(tmp_path, *VIT, "model.arch=vit_relpos_small_patch16_224")


def test_token_heads_read_the_class_token_or_the_patch_tokens():
    x = torch.randn(4, 10, 6)  # 4 images, the class token and 9 patch tokens, 6 channels
    torch.testing.assert_close(Head(6, "gap", layout="NLC", token_pool="cls", prefix_tokens=1)(x), x[:, 0])
    torch.testing.assert_close(Head(6, "gap", layout="NLC", prefix_tokens=1).pooled(x), x[:, 0])  # auto: cls
    mean = Head(6, "cbe", dim=8, layout="NLC", token_pool="mean", prefix_tokens=1).eval()
    torch.testing.assert_close(mean.pooled(x), x[:, 1:].mean(dim=1))
    torch.testing.assert_close(mean(x), mean.expand(x[:, 1:]).mean(dim=1))  # per patch token, then the mean
    cls = Head(6, "cbe", dim=8, layout="NLC", token_pool="cls", prefix_tokens=1).eval()
    torch.testing.assert_close(cls(x), cls.expand(x[:, :1])[:, 0])
    with pytest.raises(ValueError, match="this backbone has none"):
        Head(6, "gap", layout="NLC", token_pool="cls", prefix_tokens=0)
    with pytest.raises(ValueError, match="for token outputs only"):
        Head(6, "gap", token_pool="mean")


@pytest.mark.parametrize("token_pool", ["cls", "mean"])
def test_lean_execution_equals_reference_for_a_vit(tmp_path, token_pool):
    model, cfg = _vit(tmp_path, "noise.type=spatial", "noise.std=0.25", f"model.token_pool={token_pool}",
                      "model.drop_path=0.2")
    assert_lean_equals_reference(model, cfg, moved_share=0.99)  # every parameter moves, the embedding's too


def test_lean_blockwise_saves_at_most_half_of_end_to_ends_activations(tmp_path):
    peaks = {}
    for scheme, execution in (("simultaneous", "lean"), ("end_to_end", "reference")):
        model, cfg = _vit(tmp_path, f"train.scheme={scheme}", "model.head=gap", "model.projector=16")
        with model_accounting(model) as acc:
            _run_steps(model, cfg, execution, steps=1)
        saved = acc.result()
        assert acc.held == 0
        peaks[scheme] = saved.peak
    # four uniform blocks: one block's graph (and its head's) at a time against all four
    assert peaks["simultaneous"] <= 0.5 * peaks["end_to_end"]


def test_a_vits_loss_falls(tmp_path):
    rows = run_metrics(pretrain(tiny_config(tmp_path, *VIT, "train.epochs=8", "noise.type=none", "train.lr=3e-3",
                                            "train.warmup_epochs=1")))
    first, last = (sum(r["loss"] for r in part) / 4 for part in (rows[:4], rows[-4:]))
    assert last < 0.97 * first, (first, last)  # 8% lower after 32 steps


def test_pipeline_equals_single_process_lean_for_a_vit(tmp_path):
    # stochastic depth too: each block draws its drop-path masks from its own key, whichever process runs it
    vit = [*VIT, *RUN, "model.drop_path=0.2"]
    lean = pretrain(tiny_config(tmp_path / "lean", *vit, "train.execution=lean"))
    spawn(_worker, 2, str(tmp_path / "pipe"), [*vit, "train.execution=pipeline", "train.stages=1+2,3+4"], None, False)
    assert_same_run(lean, tmp_path / "pipe")


def test_a_vit_run_resumes_exactly_is_probed_and_loads_into_timm(tmp_path):
    overrides = [*VIT, "noise.type=global", "online_probe.enabled=true", "train.epochs=2"]
    full = pretrain(tiny_config(tmp_path / "full", *overrides))
    part = tiny_config(tmp_path / "part", *overrides)
    pretrain(part, stop_after=3)
    pretrain(resume_config(part.out), resume=True)
    a, b = (load_checkpoint(run / "checkpoints/last.pt") for run in (full, tmp_path / "part"))
    assert_same_tensors(a["model"], b["model"])
    assert all(r[f"weight_change/block{k}"] > 0 for r in run_metrics(full) for k in range(1, 5))

    results = run_probe(full, ["probe.weight_decays=[1e-4,1e-2]"], random_init=True)
    assert list(results["run"]["blocks"]) == list(results["run"]["pooled"]) == [
        "block1", "block2", "block3", "block4", "concat"]

    paths = export_run(full, tmp_path / "exported")
    assert loads_into(full) == ("timm.create_model('vit_tiny_patch16_224', num_classes=0, img_size=16, in_chans=3, "
                                "patch_size=4, depth=4, embed_dim=16, num_heads=2)")
    exported = eval(loads_into(full), {"timm": timm}).eval()  # what a user pastes
    exported.load_state_dict(torch.load(paths[0]))  # strict
    model = build_model(tiny_config(tmp_path / "x", *overrides), 3, 16)
    model.load_state_dict(a["model"])
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(exported.forward_features(x), model.backbone.eval()(x), rtol=0, atol=0)
    assert_same_tensors(torch.load(full / "backbone.pt"), torch.load(paths[0]))


def test_the_position_embedding_and_class_token_train_without_weight_decay(tmp_path):
    model, cfg = _vit(tmp_path)
    optimizer = build_optimizers(model, cfg.train)[0]
    decayed = {id(p) for g in optimizer.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    embed = model.backbone.embed
    assert id(embed.pos_embed) not in decayed and id(embed.cls_token) not in decayed  # timm's no_weight_decay
    assert id(embed.patch_embed.proj.weight) in decayed


def test_a_vit_study_probes_corrupts_reports_and_names_its_blocks(tmp_path):
    """The study driver, robustness and the report run unchanged on ViT runs (one seed, end to end and blockwise)."""
    path = _write_study(tmp_path, seeds=[0], overrides=[*TINY, *VIT, "train.epochs=1", "data.synthetic_size=48"],
                        probe=[*EVAL["probe"], "probe.random_init=true"],
                        # a comparison declared at a ViT block, named by the depth of this ViT (4 blocks, not timm's 12)
                        primary=[{"variant": "blockwise", "baseline": "end_to_end", "block": "block4",
                                  "metric": "pool_linear_top1"}])
    out = run_study(load_study(path)).parent
    blockwise, end_to_end = (tmp_path / "study" / variant / "seed0" for variant in ("blockwise", "end_to_end"))
    # every run also probed at its random initialisation, reported as VARIANT@init beside the variant
    results = json.loads((out / "results.json").read_text())
    rows = results["rows"]
    at_init = {r["block"]: r["value"] for r in rows
               if r["variant"] == "blockwise@init" and r["metric"] == "linear_top1"}
    probe = json.loads((blockwise / "probe.json").read_text())
    assert at_init == {name: r["top1"] for name, r in probe["random_init"]["blocks"].items()}
    assert "| blockwise@init |" in (out / "results.md").read_text()
    [primary] = results["primary"]
    assert (primary["block"], primary["seeds"].keys()) == ("block4", {"0"})
    # ... and compared with the same network trained: what training added at equal readout
    trained = {r["block"]: r["value"] for r in rows if r["variant"] == "blockwise" and r["metric"] == "linear_top1"}
    stats = {s["block"]: s for s in results["summary"]
             if s["variant"] == "blockwise@init" and s["metric"] == "linear_top1"}
    assert {b: (s["baseline"], s["diff_mean"]) for b, s in stats.items()} == {
        b: ("blockwise", pytest.approx(at_init[b] - trained[b])) for b in at_init}
    for run in (blockwise, end_to_end):
        block4 = json.loads((run / "robustness.json").read_text())["blocks"]["block4"]
        assert set(block4["errors"]["gaussian_noise"]) == {"1", "3"} and 0 <= block4["mean_corruption_error"] <= 100
    assert depth_names(blockwise) == {f"block{k}": f"block{k}" for k in range(1, 5)}  # transformer block k - 1
    assert block_names("0-2,3", "vit_tiny_patch16_224", BackboneOptions(depth=4)) == {"block1": "block3",
                                                                                       "block2": "block4"}
    report = write_report([blockwise, end_to_end], tmp_path / "report").read_text()
    assert "`train.scheme: 'simultaneous' -> 'end_to_end'`" in report and "mCE" in report


def test_a_killed_vit_run_resumes_to_the_uninterrupted_result(tmp_path):
    vit = [*VIT, "model.drop_path=0.1"]
    uninterrupted = pretrain(tiny_config(tmp_path / "full", *KILL_RUN, *vit))
    out = tmp_path / "run"
    proc = _start(out, *vit)
    _wait_for_step(out, 5, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    pretrain(resume_config(out), resume=True)
    assert_same_tensors(load_checkpoint(out / "checkpoints/last.pt")["model"],
                        load_checkpoint(uninterrupted / "checkpoints/last.pt")["model"])


@pytest.mark.parametrize("switches", [["train.amp=bf16", "train.channels_last=true"], ["train.amp=fp16"]])
def test_a_vit_trains_under_autocast_like_float32(tmp_path, switches):
    runs = [pretrain(tiny_config(tmp_path / name, *VIT, *overrides, "train.max_steps=4"))
            for name, overrides in (("fp32", ()), ("switched", switches))]
    losses = [[r["loss"] for r in run_metrics(run)] for run in runs]
    assert losses[1] == pytest.approx(losses[0], rel=0.01)
