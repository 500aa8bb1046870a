"""The CMM walk on a CUDA GPU (Triton) against the pure-torch reference; skipped without a GPU.
The device check runs everywhere."""

from __future__ import annotations

import pytest
import torch
from conftest import fff_tree

from lazyneuron.kernels import cmm as K
from lazyneuron.kernels import cmm_gpu
from lazyneuron.methods.fff import FFFLayer

cuda = pytest.mark.skipif(not cmm_gpu.available(torch.device("cuda")), reason="needs a CUDA GPU and Triton")


def _tree(depth: int, d: int, o: int, dtype: torch.dtype = torch.float32, seed: int = 0, bias: bool = True, device: str = "cuda"):
    return fff_tree(depth, d, o, dtype, seed, bias, device)


def test_cmm_refuses_mixed_devices() -> None:
    w_in, b_in, w_out, b_out = _tree(2, 8, 8, device="cpu")
    with pytest.raises(ValueError, match="one device.*w_in on meta"):
        K.cmm(torch.randn(3, 8), w_in.to("meta"), b_in, w_out, b_out)


@cuda
@pytest.mark.parametrize("depth", [0, 1, 3, 6, 10])
@pytest.mark.parametrize("batch", [1, 3, 37, 300])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_cmm_matches_reference(depth: int, batch: int, dtype: torch.dtype) -> None:
    d, o = 48, 40
    w_in, b_in, w_out, b_out = _tree(depth, d, o, dtype, seed=depth)
    x = torch.randn(batch, d, generator=torch.Generator().manual_seed(batch)).cuda()
    y_ref, nodes_ref = K.reference(x, w_in, b_in, w_out, b_out)
    y, nodes = K.cmm(x, w_in, b_in, w_out, b_out, return_nodes=True)
    assert y.device == x.device and y.dtype == torch.float32 and y.shape == (batch, o)
    assert torch.equal(nodes, nodes_ref)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    assert torch.allclose(y, y_ref, atol=tol * (depth + 1), rtol=1e-4)
    # and on the CPU: the same paths from the compiled walk
    _, nodes_cpu = K.cmm(x.cpu(), w_in.cpu(), b_in.cpu(), w_out.cpu(), b_out.cpu(), return_nodes=True)
    assert torch.equal(nodes.cpu(), nodes_cpu)


@cuda
@pytest.mark.parametrize(("d", "o"), [(5, 24), (64, 100), (100, 7), (768, 768), (768, 3072), (4096, 1000)])
def test_gpu_cmm_across_widths_strides_and_activations(d: int, o: int) -> None:
    w_in, b_in, w_out, b_out = _tree(5, d, o, seed=d)
    x = torch.randn(33, d, device="cuda")
    packed = torch.cat([w_in, w_out], 1)  # the packed layout: rows read through a stride
    for act in sorted(K.ACTIVATIONS):
        y_ref, nodes_ref = K.reference(x, w_in, b_in, w_out, b_out, act)
        y, nodes = K.cmm(x, packed[:, :d], b_in, packed[:, d:], b_out, act, return_nodes=True)
        assert torch.equal(nodes, nodes_ref), act
        assert torch.allclose(y, y_ref, atol=1e-3, rtol=1e-4), act
    y, _ = K.cmm(x, w_in, None, w_out, None)
    assert torch.allclose(y, K.reference(x, w_in, None, w_out, None)[0], atol=1e-3, rtol=1e-4)


@cuda
def test_gpu_cmm_rejects_bad_input() -> None:
    w_in, b_in, w_out, b_out = _tree(3, 16, 8)
    with pytest.raises(ValueError, match="features"):
        K.cmm(torch.randn(2, 15, device="cuda"), w_in, b_in, w_out, b_out)
    with pytest.raises(ValueError, match="contiguous rows"):
        K.cmm(torch.randn(2, 16, device="cuda"), w_in.t().contiguous().t(), b_in, w_out, b_out)
    with pytest.raises(ValueError, match="b_out"):
        K.cmm(torch.randn(2, 16, device="cuda"), w_in, b_in, w_out, b_out[:-1])
    y, nodes = K.cmm(torch.randn(0, 16, device="cuda"), w_in, b_in, w_out, b_out, return_nodes=True)
    assert y.shape == (0, 8) and nodes.shape == (0, 4)


@cuda
def test_fff_layer_on_gpu_matches_cpu_and_counts_path_nodes() -> None:
    torch.manual_seed(0)
    layer = FFFLayer(64, 48, depth=6).eval()
    x = torch.randn(2, 11, 64)
    with torch.no_grad():
        y_cpu = layer(x)
        gpu = FFFLayer(64, 48, depth=6).eval()
        gpu.load_state_dict(layer.state_dict())
        gpu = gpu.cuda()
        gpu.track = True
        y_gpu = gpu(x.cuda())
    assert torch.allclose(y_gpu.cpu(), y_cpu, atol=1e-4, rtol=1e-4)
    assert gpu.nodes_touched == 22 * 7  # tokens x (depth + 1): only the path nodes


def test_gpu_benchmark_errors_name_the_fix() -> None:
    from lazyneuron.errors import ConfigError
    from lazyneuron.kernels import bench

    with pytest.raises(ConfigError, match="unknown device 'gpu'"):
        bench.run("cmm", quick=True, progress=False, device="gpu")
    with pytest.raises(ConfigError, match="CPU only.*--kernel cmm"):
        bench.run("sparse_gemv", quick=True, progress=False, device="cuda")
    if not cmm_gpu.available(torch.device("cuda")):
        with pytest.raises(ConfigError, match="needs a CUDA device.*--device cpu"):
            bench.run("cmm", quick=True, progress=False, device="cuda")


@cuda
def test_fast_feedforward_applied_on_gpu_matches_cpu() -> None:
    import lazyneuron as ln
    from conftest import tiny_bert
    from lazyneuron.methods.fff import FastFeedForwardConfig

    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    m_cpu = tiny_bert()
    m_gpu = tiny_bert().cuda()
    m_gpu.load_state_dict(m_cpu.state_dict())
    torch.manual_seed(0)
    ln.apply_(m_cpu, FastFeedForwardConfig(depth=4))
    torch.manual_seed(0)
    ln.apply_(m_gpu, FastFeedForwardConfig(depth=4))
    with torch.no_grad():
        y_cpu = m_cpu(ids).last_hidden_state
        y_gpu = m_gpu(ids.cuda()).last_hidden_state
    assert all(p.is_cuda for p in m_gpu.parameters())
    assert torch.allclose(y_gpu.cpu(), y_cpu, atol=1e-3, rtol=1e-3)
    ln.revert_(m_gpu)
    assert all(p.is_cuda for p in m_gpu.parameters())
