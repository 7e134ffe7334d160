"""The ATen sparse stage of the contextual loss's CUDA backend (csrc/cuda/contextual_aten.h), compiled as a small CPU
extension and run on CPU tensors (it is plain ATen): L_ctx and the context part of dL/dF from neighbour lists built
by the float64 reference, against the reference's loss and SPEC's closed form (dL_ctx/dF = (Gc + Gcᵀ) F). This
covers the host-side algorithm of csrc/cuda/contextual.cu that the emulation driver (list kernel) cannot."""
import hashlib
import os

import pytest
import torch

from flashdml.reference.contextual import _context_forward, contextual_context_grad_closed_form

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_SRC = r"""
#include <torch/extension.h>
#include "contextual_aten.h"
using namespace flashdml::cuda::ctxa;
std::vector<at::Tensor> stage(at::Tensor ptr, at::Tensor col, at::Tensor flag, at::Tensor labels, at::Tensor F) {
  const int64_t B = labels.size(0);
  const Context cx = build_context(ptr, col, flag, B);
  const at::Tensor cls = class_keys(labels);
  return {l_ctx(cx, cls), ctx_grad(cx, cls, F)};
}
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("stage", &stage); }
"""


@pytest.fixture(scope="module")
def ext():
    from torch.utils import cpp_extension

    try:  # torch's extension cache: rebuilt only when the header or the source changes (~1 min)
        header = open(os.path.join(ROOT, "csrc", "cuda", "contextual_aten.h")).read()
        return cpp_extension.load_inline(
            "flashdml_ctx_aten_test", cpp_sources=[f"// {hashlib.sha1(header.encode()).hexdigest()}\n" + _SRC],
            extra_include_paths=[f"{ROOT}/csrc/cuda", f"{ROOT}/csrc/include"], extra_cflags=["-O1", "-std=c++20"],
            verbose=False)
    except Exception as exc:  # noqa: BLE001
        pytest.skip(f"cannot build the test extension here: {exc}")


def _batch(B, d, per_class, seed, spread=0.7):
    g = torch.Generator().manual_seed(seed)
    labels = (torch.arange(B) // per_class)[torch.randperm(B, generator=g)]
    centres = torch.randn((B + per_class - 1) // per_class, d, generator=g)
    return centres[labels] + spread * torch.randn(B, d, generator=g), labels


@pytest.mark.parametrize("B,d,per_class,k,eps,seed,dups", [
    (8, 5, 4, 2, 0.05, 0, False), (37, 16, 4, 4, 0.05, 1, True), (60, 6, 30, 4, 0.05, 2, False),
    (70, 3, 6, 8, 0.0, 3, True), (45, 6, 5, 4, 1.5, 4, False),
])
def test_aten_stage_matches_reference(ext, B, d, per_class, k, eps, seed, dups):
    x, labels = _batch(B, d, per_class, seed)
    if dups:
        x[3] = x[5] = x[0]  # exact duplicates: clamped entries (C = 0) off the diagonal
    labels = labels * 7 - 3  # arbitrary label values
    F = torch.nn.functional.normalize(x.double(), dim=1)
    f = _context_forward(F @ F.T, labels[:, None] == labels[None, :], k, eps, 10.0)
    N, P, C = f["N"].bool(), f["P"].bool(), f["C"]
    rows, cols = torch.nonzero(N, as_tuple=True)
    ptr = torch.zeros(B + 1, dtype=torch.long)
    ptr[1:] = torch.cumsum(N.sum(1), 0)
    flag = (P[rows, cols].long() | ((~C[rows, cols]).long() << 1)).to(torch.uint8)
    lc, g = ext.stage(ptr, cols.int(), flag, labels, F)
    assert lc.item() == pytest.approx(f["L_ctx"].item(), rel=1e-12, abs=1e-15)
    Gc = contextual_context_grad_closed_form(F, labels, k=k, eps=eps, ste_slope=10.0, normalize=False) / 20.0
    want = (Gc + Gc.T) @ F
    assert (g - want).abs().max().item() <= 1e-10 * want.abs().max().item()


def test_aten_stage_collapsed_batch_error(ext):
    B = 5
    ptr = torch.arange(B + 1) * B
    col = torch.arange(B).repeat(B).int()
    flag = torch.full((B * B,), 3, dtype=torch.uint8)
    with pytest.raises(ValueError, match="collapsed batch — every sample is in the k-neighbourhood of row 0"):
        ext.stage(ptr, col, flag, torch.zeros(B, dtype=torch.long), torch.ones(B, 2, dtype=torch.float64))


def _cuda_op_available():
    import flashdml as fd

    return torch.cuda.is_available() and fd.available_backends()["cuda"][0] and bool(
        torch._C._dispatch_has_kernel_for_dispatch_key("flashdml::contextual_fwd", "CUDA"))


@pytest.mark.skipif(not _cuda_op_available(), reason="needs a CUDA device and the CUDA build of flashdml._C")
@pytest.mark.parametrize("B,d,per_class,k,eps", [(8, 5, 4, 2, 0.05), (70, 3, 6, 8, 0.0), (257, 129, 4, 4, 0.05),
                                                 (600, 64, 8, 40, 0.05)])
def test_cuda_backend_matches_reference(B, d, per_class, k, eps):
    import flashdml as fd
    from flashdml._debug import poison_outputs

    x, labels = _batch(B, d, per_class, B + k)
    xr = x.double().requires_grad_(True)
    ref = fd.reference.contextual_loss(xr, labels, k=k, eps=eps)
    (gr,) = torch.autograd.grad(ref * 0.7, xr)
    xf = x.cuda().requires_grad_(True)
    with fd.backend("cuda"), poison_outputs():
        got = fd.contextual_loss(xf, labels.cuda(), k=k, eps=eps)
        (gf,) = torch.autograd.grad(got * 0.7, xf)
    assert abs(got.item() - ref.item()) <= 1e-6 * abs(ref.item()) + 1e-9
    assert (gf.double().cpu() - gr).abs().max().item() <= 1e-5 * gr.abs().max().item()
