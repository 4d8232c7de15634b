"""A relevance function and a loss that are not part of relret (tests/kit/plugins.py) are registered from the
outside, configured through their own config sections, and trained for a few steps by the real Trainer
(relret/train.py in a fresh process), without a line of relret changed."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from kit import REPO, plugins
from kit.shards import write_shard_dir

from relret.config import ConfigError, TrainConfig, load_config
from relret.losses import build_loss

TINY = REPO / "configs" / "tiny_cpu.yaml"
SQUARED = [f"loss.listnet.relevance.fn={plugins.SQUARED}", "loss.listnet.omega=0.1"]
MARGIN = [f"loss.name={plugins.MARGIN}", f"loss.{plugins.MARGIN}.margin=0.3"]


@pytest.fixture(scope="module", autouse=True)
def registered():
    plugins.register()


def test_plugin_configs_load_with_their_own_sections():
    """The new names are valid where the registries are consulted; the margin loss's option is its own section,
    ListNet's options are not visible to it, and a typo in its section is named."""
    cfg = load_config(TrainConfig, TINY, MARGIN)
    assert cfg.loss.options == plugins.MarginOptions(margin=0.3)
    with pytest.raises(ConfigError, match=rf"loss.listnet is set but loss.name is '{plugins.MARGIN}'"):
        load_config(TrainConfig, TINY, [*MARGIN, "loss.listnet.omega=0.1"])
    with pytest.raises(ConfigError, match=rf"unknown key loss.{plugins.MARGIN}.margn"):
        load_config(TrainConfig, TINY, [*MARGIN, f"loss.{plugins.MARGIN}.margn=1"])
    assert load_config(TrainConfig, TINY, SQUARED).loss.options.relevance.fn == plugins.SQUARED


def test_plugin_losses_equal_a_plain_reference():
    """ListNet with the new relevance function, and the margin loss, against plain loops on one rank."""
    torch.manual_seed(0)
    audio, text, sbert = torch.randn(6, 8), torch.randn(6, 8), torch.randn(6, 16)
    ids = torch.tensor([0, 1, 2, 3, 4, 1])
    a = torch.nn.functional.normalize(audio, dim=1)
    t = torch.nn.functional.normalize(text, dim=1)
    s = torch.nn.functional.normalize(sbert, dim=1)

    listnet = build_loss(load_config(TrainConfig, TINY, SQUARED).loss)
    want = 0.0
    for i in range(6):
        g = [max(float(s[i] @ s[j]), 0.0) ** 2 / 0.1 for j in range(6)]
        p = [float(t[i] @ a[j]) / 0.05 for j in range(6)]
        zg, zp = math.log(sum(math.exp(x) for x in g)), math.log(sum(math.exp(x) for x in p))
        want += -sum(math.exp(g[j] - zg) * (p[j] - zp) for j in range(6)) / 6
    got = listnet(audio, text, caption_sbert=sbert, clip_ids=ids)
    assert got["loss"].item() == pytest.approx(want, rel=1e-5)

    margin = build_loss(load_config(TrainConfig, TINY, MARGIN).loss)
    terms = []
    for i in range(6):
        own = [j for j in range(6) if ids[j] == ids[i]]
        pos = sum(float(t[i] @ a[j]) for j in own) / len(own)
        terms += [max(0.0, 0.3 - pos + float(t[i] @ a[j])) for j in range(6) if j not in own]
    out = margin(audio, text, clip_ids=ids)
    assert out["loss"].item() == pytest.approx(sum(terms) / len(terms), rel=1e-5)
    assert out["margin_violations"].item() == pytest.approx(sum(x > 0 for x in terms) / len(terms))


@pytest.mark.slow
@pytest.mark.parametrize("name, overrides", [("squared", SQUARED), ("margin", MARGIN)])
def test_the_real_trainer_trains_a_registered_plugin(tmp_path, name, overrides):
    """relret/train.py with the plugins registered trains 2 steps, logs whatever parts the loss returns, checkpoints
    and completes; the resolved config in the run directory names the plugin."""
    write_shard_dir(tmp_path / "shards", n_clips=16, per_shard=4, seed=1)
    run = tmp_path / name
    argv = ["--config", str(TINY), "--run-dir", str(run), f"data.train=[{{path: {tmp_path / 'shards'}}}]"]
    argv += ["data.val=[]", "data.num_workers=0", "train.epochs=1", "train.log_every_steps=1", *overrides]
    env_path = str(REPO / "tests")
    proc = subprocess.run(
        [sys.executable, str(REPO / "tests" / "kit" / "plugins.py"), *argv],
        capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": env_path},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if r["kind"] == "train"]
    assert len(steps) == 2 and all(math.isfinite(r["loss"]) for r in steps)  # 16 clips / batch 8
    if name == "margin":
        assert all("margin_violations" in r and "loss_t2a" not in r for r in steps)
    else:
        assert all("target_own_mass" in r for r in steps)  # ListNet reports its graded targets
    assert json.loads((run / "status.json").read_text())["state"] == "completed"
    assert (run / "checkpoints" / "latest").exists()
    assert plugins.SQUARED in (run / "config.yaml").read_text() or plugins.MARGIN in (run / "config.yaml").read_text()
