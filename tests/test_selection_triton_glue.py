"""The public selection API (fd.knn, fd.hardest_negatives, XE with top_k) on the Triton backend, against the
reference. The kernels run under the interpreter here (tests/test_triton_selection.py covers their tiling on many
more shapes); this checks the glue: normalisation before the kernel, self / cross / pair mode, the values
recomputed differentiably from the selected pairs, and the gradients."""
import pytest
import torch

import flashdml as fd
from flashdml._debug import poison_outputs
from helpers import check_against_reference, clustered

pytestmark = pytest.mark.skipif(not fd.available_backends()["triton"][0], reason="triton backend unavailable here")


def _int_rows(n, d, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-2, 3, (n, d), generator=g).float()


@pytest.mark.parametrize("mode", ["self", "cross"])
def test_knn_exact_ties_and_gradient_match_reference(mode):
    """Integer rows with normalize=False: S is exact in fp32, so indices must equal the reference's (ties ->
    lower column), values bit-equal; the values' gradient reaches x (and y) like the reference's gather."""
    for i, (B, d, k) in enumerate([(5, 1, 2), (37, 3, 10), (70, 129, 5)]):
        x = _int_rows(B, d, i).requires_grad_()
        y = None if mode == "self" else torch.cat([x.detach()[: B // 2], _int_rows(B, d, 50 + i)]).requires_grad_()
        with fd.backend("triton"), poison_outputs():
            v, idx = fd.knn(x, y, k, normalize=False)
        xr = x.detach().double().requires_grad_()
        yr = None if y is None else y.detach().double().requires_grad_()
        rv, ridx = fd.reference.knn(xr, yr, k, normalize=False)
        assert torch.equal(idx, ridx)
        assert torch.equal(v.double(), rv.detach())
        w = torch.randn(B, k, generator=torch.Generator().manual_seed(i))
        (v * w).sum().backward()
        (rv * w.double()).sum().backward()
        torch.testing.assert_close(x.grad.double(), xr.grad, rtol=1e-6, atol=1e-6)  # fp32 sums of w * y
        if y is not None:
            torch.testing.assert_close(y.grad.double(), yr.grad, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("mode", ["self", "cross", "pair_cross"])
def test_hardest_negatives_match_reference(mode):
    for i, (B, d) in enumerate([(6, 1), (37, 3), (50, 129)]):
        x = _int_rows(B, d, 10 + i)
        labels = torch.randint(0, 4, (B,), generator=torch.Generator().manual_seed(i))
        y, ref_labels = None, None
        if mode == "cross":
            y = torch.cat([x[:10], _int_rows(B + 7, d, 60 + i)])
            ref_labels = torch.randint(0, 4, (y.shape[0],), generator=torch.Generator().manual_seed(70 + i))
        elif mode == "pair_cross":
            y, labels = _int_rows(B, d, 80 + i), None
        for k in (1, B, 3 * B):
            with fd.backend("triton"), poison_outputs():
                v, r, c = fd.hardest_negatives(x, y, labels, ref_labels, k, normalize=False)
            rv, rr, rc = fd.reference.hardest_negatives(x.double(), None if y is None else y.double(), labels,
                                                        ref_labels, k, normalize=False)
            assert torch.equal(r, rr) and torch.equal(c, rc)
            assert torch.equal(v.double(), rv)


@pytest.mark.parametrize("mode", ["self", "cross"])
def test_xe_negative_mining_matches_reference(mode):
    for i, (B, d) in enumerate([(9, 3), (40, 129)]):
        x, labels = clustered(B, d, n_classes=max(1, B // 4), seed=i)
        y, ref_labels = (None, None) if mode == "self" else clustered(B + 5, d, n_classes=max(1, B // 4), seed=30 + i)
        for k in (1, B):
            tensors = dict(x=x, y=y, labels=labels, ref_labels=ref_labels,
                           temperature=torch.tensor(0.1, requires_grad=True))
            check_against_reference("cross_example_softmax", "triton", tensors, dict(top_k=k),
                                    grad_names=("x", "y", "temperature"), rtol=2e-5, atol=2e-6,
                                    atol_by_name={"temperature": 1e-4})
