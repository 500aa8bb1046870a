"""Fast kernels held to their pure-torch references across shapes, dtypes, batches, sparsities."""

from __future__ import annotations

import pytest
import torch

from lazyneuron.kernels import sparse_gemv as K

pytestmark = pytest.mark.skipif(not K.available(), reason="C++ kernel did not build here (the fallback is the reference itself)")


@pytest.mark.parametrize("in_f,out_f", [(64, 48), (576, 1536), (1536, 576), (7, 2049), (300, 33)])
@pytest.mark.parametrize("batch", [1, 3, 8, 16])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sparse_gemv_matches_reference(in_f: int, out_f: int, batch: int, sparsity: float, dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(in_f * 31 + out_f + batch)
    x = torch.randn(batch, in_f, generator=g)
    wt = torch.randn(in_f, out_f, generator=g).to(dtype)
    bias = torch.randn(out_f, generator=g)
    centre = 0.1 * torch.randn(in_f, generator=g)
    thr = torch.tensor([float("-inf") if sparsity == 0 else float("inf") if sparsity == 1 else float(torch.quantile(x.abs(), sparsity))])
    y, rows = K.sparse_gemv(x, wt, bias, centre, thr)
    ref = K.reference(x, wt, bias, centre, thr)
    tol = 1e-4 * (1 + ref.abs().max().item())
    assert (y - ref).abs().max().item() <= tol
    active = ((x - centre).abs() > thr).any(0).sum().item()
    assert rows == active  # reads exactly the union of active rows


def test_per_channel_threshold_and_no_bias() -> None:
    x = torch.randn(2, 100)
    wt = torch.randn(100, 40)
    thr = torch.rand(100)
    y, _ = K.sparse_gemv(x, wt, None, None, thr)
    assert torch.allclose(y, K.reference(x, wt, None, None, thr), atol=1e-4)


@pytest.mark.parametrize("batch", [1, 4, 16])
@pytest.mark.parametrize("thr", [0.0, 0.5, 2.0])
def test_cats_mlp_matches_reference(batch: int, thr: float) -> None:
    g = torch.Generator().manual_seed(batch)
    x, gate = torch.randn(batch, 64, generator=g), torch.randn(batch, 200, generator=g)
    up, down = torch.randn(200, 64, generator=g), torch.randn(200, 48, generator=g)
    y, n = K.cats_mlp(x, gate, up, down, thr)
    assert torch.allclose(y, K.cats_reference(x, gate, up, down, thr), atol=1e-3)
    assert n == (gate.abs() > thr).any(0).sum().item()


def test_kernel_rejects_bad_shapes() -> None:
    """Bad input comes back as a ValueError naming the problem (the kernels report it without a
    C++ exception, which some compiler / torch pairings turn into a crash), and the next good call
    works."""
    with pytest.raises(ValueError, match="10 features but wt has 11 rows"):
        K.sparse_gemv(torch.randn(1, 10), torch.randn(11, 5), None, None, torch.tensor([0.0]))
    with pytest.raises(ValueError, match="bad bias"):
        K.sparse_gemv(torch.randn(1, 10), torch.randn(10, 5), torch.randn(4), None, torch.tensor([0.0]))
    with pytest.raises(ValueError, match="cats_mlp: bad up_w"):
        K.cats_mlp(torch.randn(2, 8), torch.randn(2, 16), torch.randn(16, 9), torch.randn(16, 8), 0.1)
    y, rows = K.sparse_gemv(torch.randn(1, 10), torch.randn(10, 5), None, None, torch.tensor([0.0]))
    assert y.shape == (1, 5) and rows == 10


def test_large_batch_falls_back_to_reference() -> None:
    x, wt = torch.randn(K.MAX_BATCH + 1, 20), torch.randn(20, 8)
    y, rows = K.sparse_gemv(x, wt, None, None, torch.tensor([0.3]))
    assert rows == 20 and torch.allclose(y, K.reference(x, wt, None, None, torch.tensor([0.3])))
