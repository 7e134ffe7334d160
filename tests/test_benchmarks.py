"""The benchmark harness: statistics, failure recording, the chunked baseline's numerics, the outputs
(markdown with the unavailable providers named once, CSV, the matplotlib figures, the tqdm progress)."""
from __future__ import annotations

import csv
import io
import os
import subprocess
import sys
import textwrap

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks import harness, plots, report  # noqa: E402
from benchmarks.batch_softmax import OP as BS_OP, chunked_batch_softmax  # noqa: E402
from benchmarks.harness import GiB, Op, Provider, Result  # noqa: E402

# A dummy op family, written to a file so the worker subprocess can load it (no torch: starts fast).
DUMMY_OP = textwrap.dedent('''
    import time
    from benchmarks.harness import Op, Provider

    def _ok(shape, device):
        return lambda: sum(range(shape["n"]))

    def _raise(exc):
        def setup(shape, device):
            def fn():
                raise exc
            return fn
        return setup

    def _sleep(shape, device):
        return lambda: time.sleep(60)

    def _hog(shape, device):
        def fn():
            blocks = []
            for _ in range(64):  # up to 1 GiB, touched page by page, slowly enough to be watched
                blocks.append(bytearray(16 << 20))
                time.sleep(0.02)
            time.sleep(5)
        return fn

    def _chatty(shape, device):
        import sys
        def fn():
            sys.stderr.write("warning: " * 20000)  # more than a pipe holds
            print("noise on stdout")
        return fn

    def _exit(shape, device):
        def fn():
            import os
            os._exit(3)
        return fn

    OP = Op(name="dummy", flops=lambda s: 1e6 * s["n"], sweep="n", providers=[
        Provider("ok", _ok, reference=True),
        Provider("ok2", _ok),
        Provider("memerror", _raise(MemoryError())),
        Provider("runtime-oom", _raise(RuntimeError("[enforce fail] DefaultCPUAllocator: not enough memory: you tried"))),
        Provider("bug", _raise(ValueError("a | b"))),
        Provider("sleep", _sleep),
        Provider("hog", _hog),
        Provider("exit", _exit),
        Provider("chatty", _chatty),
        Provider("big", _ok, mem_bytes=lambda s: 40 * 2**30),
        Provider("absent", _ok, available=lambda: (False, "no such library")),
        Provider("gpu", _ok, device="cuda"),
    ], shapes={"quick": [{"n": 1000}, {"n": 4000, "only": ["ok", "ok2"]}]})
''')


@pytest.fixture(scope="module")
def dummy(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench") / "dummy_op.py"
    path.write_text(DUMMY_OP)
    return harness.load_op(str(path))


def cell(op, name, **kw):
    kw.setdefault("budget_s", 0.05)
    kw.setdefault("timeout_s", 60)
    return harness.run_cell(op, {"n": 1000}, op.provider(name), cuda_ok=False, **kw)


# ---------------------------------------------------------------------------------------------- statistics
def test_quantiles_on_known_samples():
    xs = [5, 1, 4, 2, 3]  # unsorted on purpose
    assert harness.quantile(xs, 0.5) == 3
    assert harness.quantile(xs, 0.2) == pytest.approx(1.8)
    assert harness.quantile(xs, 0.8) == pytest.approx(4.2)
    assert harness.quantile(xs, 0.0) == 1 and harness.quantile(xs, 1.0) == 5
    assert harness.quantile([1, 2, 3, 4], 0.5) == pytest.approx(2.5)
    assert harness.quantile([7.0], 0.2) == 7.0
    with pytest.raises(ValueError):
        harness.quantile([], 0.5)


def test_measure_respects_min_runs_and_budget():
    r = harness.measure(lambda: None, budget_s=0.0, min_runs=3, max_runs=100)
    assert len(r["times"]) == 3
    r = harness.measure(lambda: None, budget_s=10.0, min_runs=3, max_runs=7)
    assert len(r["times"]) == 7


def test_peak_rss_sees_an_allocation():
    if not harness.reset_peak_rss():
        pytest.skip("/proc/self/clear_refs not writable here")

    def fn():
        b = bytearray(200 << 20)  # zero-filled: every page touched
        return len(b)

    r = harness.measure(fn, budget_s=0.0, min_runs=1)
    assert 180 <= r["peak_bytes"] / harness.MiB <= 260, r


# ----------------------------------------------------------------------- failures become results, not crashes
def test_ok_cell_has_statistics(dummy):
    r = cell(dummy, "ok")
    assert r.status == "ok", r.status
    assert r.n_runs >= 3 and r.p20_ms <= r.median_ms <= r.p80_ms
    assert r.peak_mib is not None and r.flops == 1e9


@pytest.mark.parametrize("name", ["memerror", "runtime-oom"])
def test_oom_is_recorded(dummy, name):
    assert cell(dummy, name).status == "oom"


def test_error_timeout_exit_are_recorded(dummy):
    r = cell(dummy, "bug")
    assert r.status.startswith("error: ValueError") and r.median_ms is None
    assert cell(dummy, "sleep", timeout_s=3).status == "timeout: > 3 s"
    assert cell(dummy, "exit").status.startswith("error: worker exited with 3")
    assert cell(dummy, "chatty", timeout_s=20).status == "ok"


def test_memory_cap_kills_the_worker(dummy):
    r = cell(dummy, "hog", mem_cap_bytes=0.4 * GiB)
    assert r.status.startswith("oom: RSS passed the 0.4 GiB cap"), r.status


def test_skipped_not_run_and_no_cuda(dummy):
    assert cell(dummy, "big").status == "skipped: needs ~40 GiB > 12 GiB cap"
    assert cell(dummy, "absent").status == "not run: no such library"
    assert cell(dummy, "gpu").status == "not run: no CUDA device"


def test_run_ops_fills_fraction_and_speedup(dummy):
    res = harness.run_ops([dummy], "quick", only_providers=["ok", "ok2", "bug"], ceilings={"cpu": 1.0},
                          budget_s=0.05, cuda_ok=False)
    assert [(r.shape, r.provider) for r in res] == [
        ("n=1000", "ok"), ("n=1000", "ok2"), ("n=1000", "bug"), ("n=4000", "ok"), ("n=4000", "ok2")]
    for r in res:
        if r.status == "ok":
            assert r.gemm_frac == pytest.approx(r.flops / (r.median_ms / 1e3) / 1e9)
            ref = next(q for q in res if q.shape == r.shape and q.provider == "ok")
            assert r.speedup == pytest.approx(ref.median_ms / r.median_ms)
    assert res[2].speedup is None and res[2].gemm_frac is None


# -------------------------------------------------------------------------------- the chunked baseline
def _dense(x, y, labels, t):
    xn, yn = torch.nn.functional.normalize(x, dim=1), torch.nn.functional.normalize(y, dim=1)
    z = xn @ yn.T / t
    eye = torch.eye(len(x), dtype=torch.bool)
    if labels is not None:
        z = z.masked_fill((labels[:, None] == labels[None, :]) & ~eye, float("-inf"))
    return (torch.logsumexp(z, 1) - z.diagonal()).mean()


@pytest.mark.parametrize("with_labels", [True, False])
@pytest.mark.parametrize("block", [3, 1024])
def test_chunked_matches_reference(with_labels, block):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(10, 5, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randn(10, 5, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 0, 1, 1, 1, 2, 3, 3, 4, 5]) if with_labels else None
    oracles = [_dense]
    try:
        from flashdml.reference import batch_softmax as ref

        oracles.append(lambda x, y, lab, t: ref(x, y, lab, temperature=t))
    except Exception:  # noqa: BLE001 — the in-test dense formula still checks
        pass
    loss = chunked_batch_softmax(x, y, labels, temperature=0.05, block=block)
    gx, gy = torch.autograd.grad(loss, (x, y))
    for oracle in oracles:
        want = oracle(x, y, labels, 0.05)
        wx, wy = torch.autograd.grad(want, (x, y))
        torch.testing.assert_close(loss, want, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(gx, wx, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(gy, wy, rtol=1e-9, atol=1e-12)


def test_batch_softmax_module_declares_the_target_shapes():
    labels = [BS_OP.shape_label(s) for s in BS_OP.shapes["targets"]]
    assert "B=M=8192 d=256 labels=4/class" in labels and "B=M=32768 d=128 labels=4/class" in labels
    names = [p.name for s, p in harness.cells(BS_OP, "targets") if s["B"] == 32768]
    assert "reference" in names and "chunked-pytorch" not in names
    ref = BS_OP.provider("reference")
    assert ref.mem_bytes({"B": 32768, "d": 128}) > 12 * GiB > ref.mem_bytes({"B": 8192, "d": 256})
    assert BS_OP.flops({"B": 8192, "d": 256}) == 8 * 8192 * 8192 * 256


# ------------------------------------------------------------------------------------------------- outputs
def _results():
    return [Result("dummy", "n=1", "ok", median_ms=2.0, p20_ms=1.5, p80_ms=2.5, n_runs=5, peak_mib=3.0,
                   flops=1e9, gemm_frac=0.5, speedup=1.0, sweep_value=1, reference=True, shape_params={"n": 1}),
            Result("dummy", "n=1", "big", status="skipped: needs ~40 GiB > 12 GiB cap", sweep_value=1,
                   shape_params={"n": 1})]


def _sweep_results():
    """Two providers over n = 1, 2, 4 (the reference the slower), and GPU rows that could not run."""
    out = []
    for n in (1, 2, 4):
        for prov, ms, ref in (("ok", 4.0 * n, True), ("ok2", 1.0 * n, False)):
            out.append(Result("dummy", f"n={n}", prov, median_ms=ms, p20_ms=0.9 * ms, p80_ms=1.1 * ms, n_runs=5,
                              peak_mib=10.0 * n, flops=1e6 * n, gemm_frac=0.01 * n, speedup=4.0 / ms * n,
                              sweep_value=n, reference=ref, shape_params={"n": n}))
        for prov in ("gpu-a", "gpu-b"):
            out.append(Result("dummy", f"n={n}", prov, device="cuda", status="not run: no CUDA device",
                              sweep_value=n, shape_params={"n": n}))
    return out


def test_csv_has_the_columns_and_machine_info(tmp_path):
    info = report.machine_info(2, {"cpu": 123.4}, "quick", "4096x4096x256")
    report.write_csv(str(tmp_path / "r.csv"), _results() + _sweep_results()[2:4], info)
    with open(tmp_path / "r.csv") as f:
        rows = list(csv.DictReader(f))
    assert set(report.COLUMNS + report.MACHINE) <= set(rows[0])
    assert rows[0]["median_ms"] == "2.0" and rows[0]["threads"] == "2" and rows[0]["gemm_gflops_cpu"] == "123.4"
    assert rows[0]["torch"] == torch.__version__ and rows[0]["cpu_model"]
    assert rows[1]["status"].startswith("skipped") and rows[1]["median_ms"] == ""
    assert [r["status"] for r in rows[2:]] == ["not run: no CUDA device"] * 2  # the CSV keeps every cell


def test_markdown_table():
    md = report.markdown_table(_results()).splitlines()
    assert md[0].startswith("| op | shape | provider | median ms | p20 ms | p80 ms | peak MiB")
    assert len(md) == 4 and "| 50.0% | 1.00x |" in md[2] and md[3].endswith("skipped: needs ~40 GiB > 12 GiB cap |")


def test_not_run_providers_are_named_once_not_per_shape():
    res = _sweep_results() + [Result("other", "n=1", "peer", status="not run: peerlib not installed"),
                              Result("other", "n=1", "gpu-a", device="cuda", status="not run: no CUDA device"),
                              Result("dummy", "n=1", "peer", status="ok", median_ms=1.0),
                              Result("other", "n=2", "peer", status="not run: peerlib not installed")]
    md = report.markdown_table(res)
    assert "| not run" not in md and md.count("not run") == 2
    assert report.not_run_lines(res) == ["not run: gpu-a, gpu-b — no CUDA device",
                                         "not run: peer (other) — peerlib not installed"]
    rows = [ln for ln in md.splitlines() if ln.startswith("| dummy")]
    assert len(rows) == 7  # the six ok cells and the ok peer; no row for the 6 + 1 GPU cells
    assert md.splitlines()[-2:] == report.not_run_lines(res)


def _texts(items):
    return [t.get_text() for t in items]


def test_op_figure_has_time_and_memory_panels(dummy):
    fig = plots.op_figure(dummy, _sweep_results(), {"cpu_model": "Test CPU", "threads": 2, "mode": "quick"})
    try:
        ax_t, ax_m = fig.axes
        assert "time" in ax_t.get_title() and "memory" in ax_m.get_title()
        assert "ms" in ax_t.get_ylabel() and "MiB" in ax_m.get_ylabel()
        for ax in (ax_t, ax_m):
            assert ax.get_xscale() == "log" and ax.get_yscale() == "log" and ax.get_xlabel() == "n"
        assert _texts(ax_t.get_legend().get_texts()) == ["ok", "ok2"]  # the not-run GPU rows draw nothing
        lines = {ln.get_label(): ln for ln in ax_m.get_lines()}
        assert list(lines["ok2"].get_xdata()) == [1, 2, 4] and list(lines["ok2"].get_ydata()) == [10, 20, 40]
        assert lines["ok"].get_linestyle() == "--"  # the reference is dashed
        assert "dummy" in fig._suptitle.get_text() and "Test CPU" in fig._suptitle.get_text()
    finally:
        plots._pyplot().close(fig)
    assert plots.op_figure(dummy, _sweep_results()[2:4], {}) is None  # nothing ran: no figure


def test_summary_figure_takes_each_op_at_its_largest_shape(dummy):
    res = _sweep_results() + [Result("other", "n=9", "fast", median_ms=1.0, flops=1.0, speedup=8.0,
                                     gemm_frac=0.25, shape_params={"n": 9}),
                              Result("other", "n=9", "ref", median_ms=8.0, flops=1.0, speedup=1.0,
                                     reference=True, shape_params={"n": 9})]
    other = Op(name="other", shapes={}, providers=[], flops=lambda s: 1.0)
    fig = plots.summary_figure([dummy, other], res, {"threads": 2})
    try:
        ax_s, ax_g = fig.axes
        assert ax_s.get_xscale() == "log" and "speed-up" in ax_s.get_xlabel() and "GEMM" in ax_g.get_xlabel()
        assert _texts(ax_s.get_yticklabels()) == ["dummy\nn=4", "other\nn=9"]
        # one bar per non-reference provider and op: ok2 at n = 4 (4x) and fast (8x)
        assert sorted(p.get_width() for p in ax_s.patches) == [4.0, 8.0]
        assert sorted(round(p.get_width(), 6) for p in ax_g.patches) == [4.0, 25.0]
        assert _texts(ax_g.get_legend().get_texts()) == ["ok2", "fast"]
    finally:
        plots._pyplot().close(fig)
    assert plots.summary_figure([dummy], _results(), {}) is None  # only a baseline: nothing to compare


def test_write_all_makes_csv_pngs_and_summary(tmp_path, dummy):
    info = report.machine_info(2, {"cpu": 1.0}, "quick")
    paths = report.write_all(str(tmp_path), "quick", [dummy], _sweep_results(), info)
    assert sorted(os.path.basename(p) for p in paths) == [
        "dummy_quick.csv", "dummy_quick.png", "summary_quick.md", "summary_quick.png"]
    for name in ("dummy_quick.png", "summary_quick.png"):
        data = (tmp_path / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    md = (tmp_path / "summary_quick.md").read_text()
    assert md.count("no CUDA device") == 1


def test_progress_goes_through_tqdm(dummy):
    s = io.StringIO()
    res = harness.run_ops([dummy], "quick", only_providers=["ok", "absent"], progress_stream=s, budget_s=0.0,
                          cuda_ok=False)
    out = s.getvalue()
    assert len(res) == 3 and "3/3" in out and "dummy" in out and "n=4000 ok" in out  # n=4000 runs only ok, ok2
    s = io.StringIO()
    harness.run_ops([dummy], "quick", only_providers=["absent"], progress_stream=s, show_progress=False)
    assert s.getvalue() == ""


def test_cli_and_library_do_not_import_the_extras():
    """--help / --list and `import flashdml` work without matplotlib and tqdm (benchmark-only extras)."""
    code = textwrap.dedent("""
        import sys
        sys.modules["matplotlib"] = None  # any import of them now fails
        sys.modules["tqdm"] = None
        import flashdml
        from benchmarks import report, plots
        from benchmarks.__main__ import main
        assert main(["--list", "--quick", "--op", "knn"]) == 0
        try:
            main(["--help"])
        except SystemExit as e:
            assert e.code == 0
    """)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "python")]))
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "knn\tB=1000 M=10000 d=128 k=10\treference\tcpu" in r.stdout and "--quick" in r.stdout


def test_fork_server_runs_cells_like_fresh_subprocesses(dummy):
    """CPU cells forked from the server (torch imported once) end with the same statuses, kills included,
    and the server survives a killed or exiting cell."""
    from benchmarks.forkserver import ForkServer

    server = ForkServer(harness.worker_env(), harness.ROOT, [dummy.module])
    assert server.alive
    try:
        def run(name, **kw):
            return cell(dummy, name, server=server, **kw)

        r = run("ok")
        assert r.status == "ok" and r.n_runs >= 3 and r.peak_mib is not None
        assert run("memerror").status == "oom"
        assert run("bug").status.startswith("error: ValueError")
        assert run("exit").status.startswith("error: worker exited with 3")
        assert run("sleep", timeout_s=3).status == "timeout: > 3 s"
        assert run("hog", mem_cap_bytes=0.4 * GiB).status.startswith("oom: RSS passed the 0.4 GiB cap")
        assert run("chatty", timeout_s=20).status == "ok"
        assert server.alive and run("ok2").status == "ok"
    finally:
        server.close()
    assert server.proc.returncode == 0
