"""tools/run_pml_tests.py on a fake pml tests package (so the tool is checked without pml's sources): the two passes
run, the drop-in pass really substitutes the classes (a test that checks the class's module flips), outcomes are
reported per test, and the exit status says whether the passes agree."""
import json
import os
import sys
import textwrap

import pytest

pytest.importorskip("pytorch_metric_learning")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))

import run_pml_tests  # noqa: E402

FAKE = textwrap.dedent('''
    import unittest

    import torch
    from pytorch_metric_learning.losses import NTXentLoss

    from .. import TEST_DEVICE
    from .helpers import clustered


    class TestFake(unittest.TestCase):
        def test_value_both(self):
            x, labels = clustered()
            self.assertGreater(NTXentLoss(temperature=0.1)(x.to(TEST_DEVICE), labels).item(), 0)

        def test_class_is_pml(self):
            self.assertTrue(NTXentLoss.__module__.startswith("pytorch_metric_learning"))

        def test_fails_both(self):
            self.assertEqual(1, 2)

        @unittest.skip("on purpose")
        def test_skipped(self):
            pass
''')


def _fake_tests(tmp_path):
    tests = tmp_path / "tests"
    (tests / "losses").mkdir(parents=True)
    (tests / "__init__.py").write_text("import os, torch\nTEST_DEVICE = torch.device(os.environ['TEST_DEVICE'])\n")
    (tests / "losses" / "__init__.py").write_text("")
    (tests / "losses" / "helpers.py").write_text(
        "import torch\n\ndef clustered():\n    g = torch.Generator().manual_seed(0)\n"
        "    return torch.randn(12, 4, generator=g), torch.arange(12) // 3\n")
    (tests / "losses" / "test_fake.py").write_text(FAKE)
    return tests


def test_tool_runs_both_passes_and_reports_the_difference(tmp_path, capsys):
    tests = _fake_tests(tmp_path)
    out = tmp_path / "res.json"
    rc = run_pml_tests.main([str(tests), "--files", "losses/test_fake.py", "--json", str(out)])
    text = capsys.readouterr().out
    assert rc == 1 and "OUTCOMES DIFFER" in text
    res = json.loads(out.read_text())
    key = "tests/losses/test_fake.py::TestFake::"
    assert res["pml"]["outcomes"] == {key + "test_value_both": "passed", key + "test_class_is_pml": "passed",
                                      key + "test_fails_both": "failed", key + "test_skipped": "skipped"}
    assert res["flashdml"]["outcomes"][key + "test_class_is_pml"] == "failed"  # the class really was swapped
    assert res["flashdml"]["outcomes"][key + "test_value_both"] == "passed"
    assert "NTXentLoss" in res["flashdml"]["replaced"] and res["pml"]["replaced"] == []
    assert res["flashdml"]["fused_calls"].get("NTXentLoss", 0) >= 1 and res["pml"]["fused_calls"] == {}
    assert f"passed   failed    {key}test_class_is_pml   <-- differs" in text


def test_compare_agrees_and_missing_files(tmp_path, capsys):
    same = {"outcomes": {"a::t1": "passed", "a::t2": "failed"}, "replaced": ["X"], "fused_calls": {"X": 3}}
    lines, ok = run_pml_tests.compare({"pml": same, "flashdml": same})
    assert ok and lines[-1] == "outcomes match" and "fused flashdml calls: X 3" in lines
    other = dict(same, outcomes={"a::t1": "passed"})  # a test that did not run at all counts as a difference
    lines, ok = run_pml_tests.compare({"pml": same, "flashdml": other})
    assert not ok and any("absent" in line and "differs" in line for line in lines)
    assert run_pml_tests.main([str(tmp_path), "--files", "losses/nope.py"]) == 2
    assert "nope.py" in capsys.readouterr().err
