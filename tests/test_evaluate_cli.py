"""`python -m flashdml.evaluate`: .npy / .pt inputs, self and gallery mode, table and JSON output, errors."""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import flashdml as fd
from flashdml import evaluate as cli

pytestmark = pytest.mark.skipif(not fd.available_backends()["cpu"][0], reason="flashdml._C not built")


def _data(n=300, d=12, classes=30, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, classes, (n,), generator=g)
    x = torch.randn(classes, d, generator=g)[labels] + torch.randn(n, d, generator=g)
    return x, labels


def test_self_mode_npy_table_and_json(tmp_path, capsys):
    x, labels = _data()
    np.save(tmp_path / "x.npy", x.numpy())
    np.save(tmp_path / "y.npy", labels.numpy())
    out = tmp_path / "out.json"
    rc = cli.main([str(tmp_path / "x.npy"), str(tmp_path / "y.npy"), "--ks", "1", "5", "--json", str(out),
                   "--no-progress"])
    assert rc == 0
    text = capsys.readouterr().out
    with fd.backend("cpu"):
        want = fd.metrics.evaluate(x, labels, ks=(1, 5), progress=False)
    got = json.loads(out.read_text())
    assert set(got) == set(want) == {"recall@1", "recall@5", "map@r", "pr_auc", "opis", "eps_opis"}
    for k, v in want.items():
        assert got[k] == pytest.approx(v, abs=1e-15)
        assert k in text and f"{v:.6f}" in text


def test_gallery_mode_pt_files(tmp_path, capsys):
    x, labels = _data(seed=1)
    torch.save(x[:100], tmp_path / "q.pt")
    torch.save({"labels": labels[:100]}, tmp_path / "ql.pt")
    torch.save(x[100:].double(), tmp_path / "g.pt")
    torch.save(labels[100:], tmp_path / "gl.pt")
    out = tmp_path / "r.json"
    rc = cli.main([str(tmp_path / "q.pt"), str(tmp_path / "ql.pt"), "--gallery", str(tmp_path / "g.pt"),
                   "--gallery-labels", str(tmp_path / "gl.pt"), "--ks", "1", "10", "--json", str(out)])
    assert rc == 0
    got = json.loads(out.read_text())
    assert set(got) == {"recall@1", "recall@10", "map@r", "pr_auc"}  # OPIS dropped in gallery mode
    want = fd.reference.recall_at_k(x[:100].double(), labels[:100], ks=(1, 10), y=x[100:].double(), ref_labels=labels[100:])
    assert got["recall@10"] == pytest.approx(want[10], abs=1e-12)
    assert "gallery of 200" in capsys.readouterr().out


def test_errors(tmp_path, capsys):
    x, labels = _data(n=20)
    np.save(tmp_path / "x.npy", x.numpy())
    np.save(tmp_path / "l.npy", labels[:-1].numpy())
    assert cli.main([str(tmp_path / "x.npy"), str(tmp_path / "l.npy")]) == 2
    assert "labels" in capsys.readouterr().err
    assert cli.main([str(tmp_path / "x.npy"), str(tmp_path / "missing.npy")]) == 2
    assert "no such file" in capsys.readouterr().err
    assert cli.main([str(tmp_path / "x.npy"), str(tmp_path / "l.npy"), "--gallery", str(tmp_path / "x.npy")]) == 2


def test_runs_as_module(tmp_path):
    x, labels = _data(n=50)
    np.save(tmp_path / "x.npy", x.numpy())
    np.save(tmp_path / "l.npy", labels.numpy())
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    r = subprocess.run([sys.executable, "-m", "flashdml.evaluate", str(tmp_path / "x.npy"), str(tmp_path / "l.npy"),
                        "--metrics", "map_at_r", "pr_auc"], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "map@r" in r.stdout and "pr_auc" in r.stdout and "recall" not in r.stdout
    with fd.backend("cpu"):
        v = fd.metrics.map_at_r(x, labels)
    assert (f"{v:.6f}" if not math.isnan(v) else "nan") in r.stdout
