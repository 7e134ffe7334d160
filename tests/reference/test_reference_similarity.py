"""The reference similarity / selection primitives (docs/spec.md §1.1-1.3) and the shared input validation."""
import math

import pytest
import torch

from flashdml.reference import hardest_negatives, knn, similarity

f64 = torch.float64


def _quantised(n, d, levels, seed):
    """Random rows with many exact duplicates and exactly tied similarities."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-levels, levels + 1, (n, d), generator=g).to(f64)


# ---------------------------------------------------------------------------------------------------------- 1.1
def test_similarity_hand_computed():
    # x̂ = [(.6, .8), (1, 0)], ŷ = [(0, 1), (1/√2, 1/√2)]
    x = torch.tensor([[3.0, 4.0], [1.0, 0.0]], dtype=f64)
    y = torch.tensor([[0.0, 2.0], [1.0, 1.0]], dtype=f64)
    r = 1 / math.sqrt(2)
    expected = torch.tensor([[0.8, 1.4 * r], [0.0, r]], dtype=f64)
    torch.testing.assert_close(similarity(x, y), expected, rtol=0, atol=1e-15)
    # normalize=False: plain dot products [[8, 7], [0, 1]]
    torch.testing.assert_close(similarity(x, y, normalize=False), torch.tensor([[8.0, 7.0], [0.0, 1.0]], dtype=f64))
    # self mode: x̂ x̂ᵀ = [[1, .6], [.6, 1]]
    torch.testing.assert_close(similarity(x), torch.tensor([[1.0, 0.6], [0.6, 1.0]], dtype=f64), rtol=0, atol=1e-15)


def test_similarity_zero_row_normalises_to_zero():
    x = torch.tensor([[0.0, 0.0], [2.0, 0.0]])
    S = similarity(x)
    assert torch.equal(S, torch.tensor([[0.0, 0.0], [0.0, 1.0]]))


def test_similarity_dtypes_and_gradient_dtype():
    x = torch.randn(5, 8, dtype=torch.float16, requires_grad=True)
    S = similarity(x)
    assert S.dtype == torch.float32 and S.shape == (5, 5)
    S.sum().backward()
    assert x.grad.dtype == torch.float16
    assert similarity(torch.randn(3, 4, dtype=torch.bfloat16)).dtype == torch.float32
    assert similarity(torch.randn(3, 4, dtype=f64)).dtype == f64


def test_similarity_gradcheck_through_normalisation():
    x = torch.randn(4, 3, dtype=f64, requires_grad=True)
    y = torch.randn(5, 3, dtype=f64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: similarity(a, b), (x, y))
    assert torch.autograd.gradcheck(lambda a: similarity(a), (x,))  # self mode: both factors


# ---------------------------------------------------------------------------------------------------------- 1.2
def test_knn_hand_computed_ties():
    # d = 1, normalize=False: S = x xᵀ with x = [1, 3, 2, 3]
    #   row 0: [1, 3, 2, 3] -> without col 0: 3 (col 1), 3 (col 3), 2 -> k=2: [3, 3] at [1, 3] (tie -> lower col)
    #   row 1: [3, 9, 6, 9] -> without col 1: 9 (col 3), 6 (col 2)
    #   row 2: [2, 6, 4, 6] -> without col 2: 6 (col 1), 6 (col 3)
    #   row 3: [3, 9, 6, 9] -> without col 3: 9 (col 1), 6 (col 2)
    x = torch.tensor([[1.0], [3.0], [2.0], [3.0]], dtype=f64)
    v, i = knn(x, k=2, normalize=False)
    assert i.dtype == torch.int64
    assert i.tolist() == [[1, 3], [3, 2], [1, 3], [1, 2]]
    assert v.tolist() == [[3, 3], [9, 6], [6, 6], [9, 6]]
    # exclude_self=False: row 1 is [9 (col 1), 9 (col 3)], row 0 keeps col 0 out of the top 2 anyway
    v, i = knn(x, k=2, normalize=False, exclude_self=False)
    assert i.tolist() == [[1, 3], [1, 3], [1, 3], [1, 3]]
    # normalize=True: all rows are +1 -> every S entry is exactly 1, order = column order
    v, i = knn(x, k=3)
    assert i.tolist() == [[1, 2, 3], [0, 2, 3], [0, 1, 3], [0, 1, 2]]
    assert torch.all(v == 1)


def _brute_knn(S, k, exclude):
    out = []
    for r in range(S.shape[0]):
        cands = [(-S[r, c].item(), c) for c in range(S.shape[1]) if not (exclude and c == r)]
        out.append([c for _, c in sorted(cands)[:k]])
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_knn_matches_brute_force_on_duplicates(seed):
    x = _quantised(13, 3, 1, seed)  # ~27 distinct rows -> many exact duplicates and tied similarities
    y = _quantised(17, 3, 1, seed + 100)
    for yy, exclude in ((None, True), (None, False), (y, True)):
        S = similarity(x, yy, normalize=False)
        M = S.shape[1]
        k = M - 1 if (yy is None and exclude) else M  # full ordering exercises every tie
        v, i = knn(x, yy, k=k, normalize=False, exclude_self=exclude)
        assert i.tolist() == _brute_knn(S, k, yy is None and exclude)
        assert torch.equal(v, S.gather(1, i))
        # normalised similarities of duplicated rows tie exactly as well
        Sn = similarity(x, yy)
        _, i2 = knn(x, yy, k=3, exclude_self=exclude)
        assert i2.tolist() == _brute_knn(Sn, 3, yy is None and exclude)


def test_knn_k_errors():
    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match="k = 4"):
        knn(x, k=4)  # 3 candidates once the query itself is excluded
    assert knn(x, k=4, exclude_self=False)[1].shape == (4, 4)
    with pytest.raises(ValueError, match="k = 6"):
        knn(x, torch.randn(5, 3), k=6)
    with pytest.raises(ValueError, match="k"):
        knn(x, k=0)
    with pytest.raises(TypeError, match="k"):
        knn(x, k=2.0)


def test_knn_values_carry_gradient():
    x = torch.randn(5, 3, dtype=f64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a: knn(a, k=2)[0], (x,))


# ---------------------------------------------------------------------------------------------------------- 1.3
def test_hardest_negatives_hand_computed():
    # d = 1, normalize=False, x = [1, 2, 3], labels [0, 0, 1]: S = [[1,2,3],[2,4,6],[3,6,9]]
    # negatives: (0,2)=3 flat 2, (1,2)=6 flat 5, (2,0)=3 flat 6, (2,1)=6 flat 7
    # sorted: 6 (flat 5), 6 (flat 7), 3 (flat 2), 3 (flat 6)
    x = torch.tensor([[1.0], [2.0], [3.0]], dtype=f64)
    labels = torch.tensor([0, 0, 1])
    v, r, c = hardest_negatives(x, labels=labels, k=4, normalize=False)
    assert v.tolist() == [6, 6, 3, 3] and r.tolist() == [1, 2, 0, 2] and c.tolist() == [2, 1, 2, 0]
    assert r.dtype == torch.int64 and c.dtype == torch.int64
    v, r, c = hardest_negatives(x, labels=labels, normalize=False)  # k=None -> k = B = 3
    assert v.tolist() == [6, 6, 3] and r.tolist() == [1, 2, 0] and c.tolist() == [2, 1, 2]
    with pytest.raises(ValueError, match="k = 5"):
        hardest_negatives(x, labels=labels, k=5, normalize=False)


def test_hardest_negatives_pair_mode():
    # labels=None: negatives are the off-diagonal entries. x = [1, 2], y = [3, 1, 2] (d = 1, dot products):
    # S = [[3, 1, 2], [6, 2, 4]]; off-diagonal: (0,1)=1, (0,2)=2, (1,0)=6, (1,2)=4
    x = torch.tensor([[1.0], [2.0]], dtype=f64)
    y = torch.tensor([[3.0], [1.0], [2.0]], dtype=f64)
    v, r, c = hardest_negatives(x, y, k=3, normalize=False)
    assert v.tolist() == [6, 4, 2] and r.tolist() == [1, 1, 0] and c.tolist() == [0, 2, 2]
    # self mode pair mode: x = [1, 2, 3] -> off-diagonal of S; 6 at (1,2) flat 5 and (2,1) flat 7
    v, r, c = hardest_negatives(torch.tensor([[1.0], [2.0], [3.0]]), k=2, normalize=False)
    assert r.tolist() == [1, 2] and c.tolist() == [2, 1]


@pytest.mark.parametrize("seed", [0, 1])
def test_hardest_negatives_matches_brute_force_on_duplicates(seed):
    g = torch.Generator().manual_seed(seed)
    x = _quantised(11, 3, 1, seed)
    y = _quantised(9, 3, 1, seed + 7)
    labels = torch.randint(0, 3, (11,), generator=g)
    ref_labels = torch.randint(0, 3, (9,), generator=g)
    for yy, rl in ((None, None), (y, ref_labels)):
        S = similarity(x, yy)
        M = S.shape[1]
        rl_ = labels if rl is None else rl
        cands = sorted((-S[i, j].item(), i * M + j) for i in range(S.shape[0]) for j in range(M)
                       if labels[i] != rl_[j])
        for k in (1, 5, len(cands)):
            v, r, c = hardest_negatives(x, yy, labels, rl, k=k)
            flat = (r * M + c).tolist()
            assert flat == [f for _, f in cands[:k]]
            assert torch.equal(v, S[r, c])


def test_hardest_negatives_gradient_flows_to_selected_entries():
    x = torch.randn(5, 3, dtype=f64, requires_grad=True)
    labels = torch.tensor([0, 0, 1, 1, 2])
    assert torch.autograd.gradcheck(lambda a: hardest_negatives(a, labels=labels, k=4)[0], (x,))


# ---------------------------------------------------------------------------------------------- input checks
@pytest.mark.parametrize("op", ["similarity", "knn", "hardest_negatives"])
def test_validation_errors(op):
    fn = {"similarity": similarity, "knn": lambda x, y=None: knn(x, y, k=1),
          "hardest_negatives": lambda x, y=None: hardest_negatives(x, y, k=1)}[op]
    with pytest.raises(ValueError, match="x must be a 2-D"):
        fn(torch.randn(4))
    with pytest.raises(ValueError, match="x is empty"):
        fn(torch.randn(0, 3))
    with pytest.raises(ValueError, match="embedding dimension"):
        fn(torch.randn(4, 3), torch.randn(4, 2))
    with pytest.raises(ValueError, match="y must be a 2-D"):
        fn(torch.randn(4, 3), torch.randn(4, 3, 1))
    with pytest.raises(TypeError, match="x must be float"):
        fn(torch.ones(4, 3, dtype=torch.int64))
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        fn([[1.0, 2.0]])


def test_label_validation_errors():
    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match="labels has 3 entries"):
        hardest_negatives(x, labels=torch.tensor([0, 1, 0]))
    with pytest.raises(TypeError, match="labels must be an integer tensor"):
        hardest_negatives(x, labels=torch.tensor([0.0, 1.0, 0.0, 1.0]))
    with pytest.raises(ValueError, match="ref_labels is required"):
        hardest_negatives(x, torch.randn(5, 3), labels=torch.tensor([0, 1, 0, 1]))
    with pytest.raises(ValueError, match="ref_labels has 4 entries"):
        hardest_negatives(x, torch.randn(5, 3), torch.tensor([0, 1, 0, 1]), torch.tensor([0, 1, 0, 1]))
    # int32 labels are accepted and give the same answer as int64
    l32 = torch.tensor([0, 1, 0, 1], dtype=torch.int32)
    a = hardest_negatives(x, labels=l32, k=3)
    b = hardest_negatives(x, labels=l32.long(), k=3)
    assert all(torch.equal(p, q) for p, q in zip(a, b))
