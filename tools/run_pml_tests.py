"""Run pytorch-metric-learning's own loss tests twice: once with pml's classes, once with flashdml's drop-ins.

    python tools/run_pml_tests.py PML_TESTS_DIR [--files losses/test_circle_loss.py ...] [-k EXPR] [--json OUT]

PML_TESTS_DIR is the ``tests`` folder of a pml source checkout (a package: its files import ``..zzz_testing_utils``).
Nothing is copied: each pass runs ``pytest.main`` in a fresh subprocess (test modules bind the classes at import
time, so one process per pass) with a plugin object that, before collection, replaces every
``pytorch_metric_learning.losses.<Name>`` that ``flashdml.integrations.pml.losses`` also defines by the drop-in
(the "flashdml" pass) or leaves pml alone (the "pml" pass). The plugin records each test's outcome and how many
calls took flashdml's fused path (a drop-in that always fell back to pml would pass pml's tests trivially).

pml's tests read TEST_DEVICE (default "cuda") and TEST_DTYPES (default "float16,float32,float64"); without a CUDA
device TEST_DEVICE is set to "cpu" unless given. The subprocess runs in a temporary directory (pml's
``tests/__init__.py`` puts the relative path "src" on sys.path; pml itself is imported from the installed package
before collection either way).

Prints one line per test with both outcomes and a summary. Exit status: 0 when every test has the same outcome in
both passes, 1 when they differ, 2 when a pass could not run.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_FILES = ("losses/test_ntxent_loss.py", "losses/test_multi_similarity_loss.py", "losses/test_circle_loss.py",
                 "losses/test_triplet_margin_loss.py")
PASSES = ("pml", "flashdml")


class SubstitutePlugin:
    """pytest plugin: optionally swaps pml's loss classes for the drop-ins before collection, and records
    outcomes (nodeid -> "passed" / "failed" / "skipped") and, per drop-in, how many calls ran fused."""

    def __init__(self, substitute: bool):
        self.substitute = substitute
        self.outcomes: dict[str, str] = {}
        self.replaced: list[str] = []
        self.fused_calls: dict[str, int] = {}

    def pytest_sessionstart(self, session):
        from pytorch_metric_learning import losses as pml_losses

        if not self.substitute:
            return
        from flashdml.integrations.pml import losses as drop_ins

        for name in drop_ins.__all__:
            if hasattr(pml_losses, name):
                cls = getattr(drop_ins, name)
                setattr(pml_losses, name, cls)
                self.replaced.append(name)
                if "_flashdml_loss" in vars(cls):
                    cls._flashdml_loss = self._counted(name, vars(cls)["_flashdml_loss"])

    def _counted(self, name, fn):
        def wrapper(module, *args):
            self.fused_calls[name] = self.fused_calls.get(name, 0) + 1
            return fn(module, *args)
        return wrapper

    def pytest_runtest_logreport(self, report):
        prev = self.outcomes.get(report.nodeid)
        if report.failed:
            self.outcomes[report.nodeid] = "failed"
        elif report.skipped and prev != "failed":
            self.outcomes[report.nodeid] = "skipped"
        elif report.when == "call" and prev is None:
            self.outcomes[report.nodeid] = "passed"

    def pytest_collectreport(self, report):
        if report.failed:
            self.outcomes[f"{report.nodeid} (collection)"] = "failed"


def _child(pass_name: str, tests_dir: str, files: list[str], keyword: str | None, out: str) -> int:
    import pytest

    plugin = SubstitutePlugin(pass_name == "flashdml")
    paths = [os.path.join(tests_dir, f) for f in files]
    args = [*paths, "-q", "-p", "no:cacheprovider", "--rootdir", os.path.dirname(tests_dir), "-o", "addopts=",
            "-W", "ignore::DeprecationWarning"]
    if keyword:
        args += ["-k", keyword]
    rc = pytest.main(args, plugins=[plugin])
    with open(out, "w") as f:
        json.dump({"rc": int(rc), "outcomes": plugin.outcomes, "replaced": plugin.replaced,
                   "fused_calls": plugin.fused_calls}, f)
    return 0


def run_pass(pass_name: str, tests_dir: str, files: list[str], keyword: str | None) -> dict:
    """One pass in a subprocess; returns its JSON record (or {"error": ...})."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (os.path.join(ROOT, "python"), env.get("PYTHONPATH")) if p)
    if "TEST_DEVICE" not in env:
        import torch

        env["TEST_DEVICE"] = "cuda" if torch.cuda.is_available() else "cpu"
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.json")
        cmd = [sys.executable, os.path.abspath(__file__), "--_pass", pass_name, "--_out", out, tests_dir,
               "--files", *files] + (["-k", keyword] if keyword else [])
        proc = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True)
        if not os.path.exists(out):
            return {"error": f"pass {pass_name} did not finish (exit {proc.returncode}):\n"
                             f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"}
        with open(out) as f:
            res = json.load(f)
        res["log"] = proc.stdout
        return res


def compare(results: dict) -> tuple[list[str], bool]:
    """Report lines (one per test: both outcomes) and whether the passes agree on every test."""
    ids = sorted(set().union(*(results[p]["outcomes"] for p in PASSES)))
    lines = [f"{'pml':8} {'flashdml':8}  test"]
    same = True
    for nodeid in ids:
        a, b = (results[p]["outcomes"].get(nodeid, "absent") for p in PASSES)
        mark = "" if a == b else "   <-- differs"
        same = same and a == b
        lines.append(f"{a:8} {b:8}  {nodeid}{mark}")
    for p in PASSES:
        counts = {}
        for o in results[p]["outcomes"].values():
            counts[o] = counts.get(o, 0) + 1
        summary = ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))
        lines.append(f"{p}: {summary or 'no tests'}")
    fused = results["flashdml"]["fused_calls"]
    lines.append(f"replaced: {', '.join(results['flashdml']['replaced']) or 'nothing'}")
    lines.append("fused flashdml calls: " + (", ".join(f"{k} {v}" for k, v in sorted(fused.items())) or "none"))
    lines.append("outcomes match" if same else "OUTCOMES DIFFER")
    return lines, same


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("tests_dir", help="pml's tests/ folder (a package)")
    ap.add_argument("--files", nargs="+", default=list(DEFAULT_FILES), help="test files relative to tests_dir")
    ap.add_argument("-k", dest="keyword", help="pytest -k expression")
    ap.add_argument("--json", help="also write both passes' outcomes here")
    ap.add_argument("--_pass", choices=PASSES, help=argparse.SUPPRESS)
    ap.add_argument("--_out", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    tests_dir = os.path.abspath(args.tests_dir)
    if args._pass:
        return _child(args._pass, tests_dir, args.files, args.keyword, args._out)
    missing = [f for f in args.files if not os.path.isfile(os.path.join(tests_dir, f))]
    if missing:
        print(f"not found under {tests_dir}: {', '.join(missing)}", file=sys.stderr)
        return 2
    results = {p: run_pass(p, tests_dir, args.files, args.keyword) for p in PASSES}
    for p in PASSES:
        if "error" in results[p]:
            print(results[p]["error"], file=sys.stderr)
            return 2
    lines, same = compare(results)
    print("\n".join(lines))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({p: {k: v for k, v in results[p].items() if k != "log"} for p in PASSES}, f, indent=1)
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
