"""Progress bars: drawn on a terminal, in the reporting process, unless switched off; never into a log file."""

from __future__ import annotations

import io
import sys

import torch

from blockssl.config import ProbeConfig
from blockssl.eval.probe import select_linear_probes
from blockssl.runtime import progress_bar


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_bars_show_on_a_terminal_only_when_enabled_and_in_the_reporting_process(monkeypatch):
    monkeypatch.setattr(sys, "stderr", Terminal())
    assert not progress_bar(range(3)).disable
    assert progress_bar(range(3), enabled=False).disable  # train.progress=false, --quiet
    assert progress_bar(range(3), main=False).disable
    monkeypatch.setattr(sys, "stderr", io.StringIO())  # a log file
    assert progress_bar(range(3)).disable


def test_probe_fits_draw_a_bar_when_asked(monkeypatch):
    g = torch.Generator().manual_seed(0)
    features, labels = torch.randn(60, 4, generator=g), torch.arange(60) % 2
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    for solver in ("lbfgs", "sgd"):
        pc = ProbeConfig(solver=solver, weight_decays=[1e-2, 1e-1], lrs=[0.1], epochs=2, batch_size=20)
        select_linear_probes([features[:40]] * 2, labels[:40], ([features[40:]] * 2, labels[40:]), 2, pc, seed=0)
        assert terminal.getvalue() == ""  # off by default: library calls stay quiet
        select_linear_probes([features[:40]] * 2, labels[:40], ([features[40:]] * 2, labels[40:]), 2, pc, seed=0,
                             progress=True)
        # Its total: 2 penalties x 2 feature sets for lbfgs, 1 lr x 2 epochs for sgd
        assert ("0/4 [" if solver == "lbfgs" else "0/2 [") in terminal.getvalue()
        assert terminal.getvalue().startswith("\rlinear probes:")
        terminal.truncate(0)
        terminal.seek(0)
