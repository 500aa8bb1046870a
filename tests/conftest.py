"""Tiny models built from configs (no network), one per adapter family."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

LLAMA_LIKE = ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3"]


def _native_abort(stderr: str) -> bool:
    """Whether the run ended with a rank's std::terminate outside any exception (SIGABRT) and its
    peer stopped by the launcher (SIGTERM), nothing else: a Python error exits with 1, a C++
    exception says "terminate called after throwing", a crash or an out-of-memory kill is another
    signal, and none of those is retried."""
    codes = [int(c) for c in re.findall(r"exitcode\s*:\s*(-?\d+)", stderr)]
    return "terminate called without an active exception" in stderr and -6 in codes and set(codes) <= {-6, -15}


def torchrun_worker(out: Path, *args: str, timeout: int = 300, fails: bool = False) -> str:
    """Run tests/ddp_worker.py under `torch.distributed.run --standalone --nproc_per_node 2` on CPU
    (a free port each time) and return its error output. Unless the run is meant to fail, a
    failure shows every rank's error output (without DDP's advice).

    A run whose only failure is a rank aborting in native code (``terminate called without an
    active exception``, SIGABRT, no Python error) is run once more in a fresh folder: the gloo
    backend's teardown does that rarely (twice in CI over many runs, never in 60 local runs) and it
    says nothing of the code under test. A second failure of any kind fails the test, with both
    runs' errors."""
    here = Path(__file__).parent
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(here.parent)}

    def run(folder: Path) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(here / "ddp_worker.py"), str(folder), *args]
        return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)

    def errors(res: subprocess.CompletedProcess) -> str:
        return "\n".join(ln for ln in res.stderr.splitlines() if "find_unused_parameters=True" not in ln)[-8000:]

    res = run(out)
    if fails:
        assert res.returncode != 0, "the run was meant to fail"
        return res.stderr
    if res.returncode != 0 and _native_abort(res.stderr):
        first = errors(res)
        for f in out.iterdir():  # the retry must write every file again
            shutil.rmtree(f) if f.is_dir() else f.unlink()
        res = run(out)
        if res.returncode != 0:
            raise AssertionError(f"torchrun exited with {res.returncode} twice; the first run aborted in native code:\n{first}\n"
                                 f"the second:\n{errors(res)}")
    if res.returncode != 0:
        raise AssertionError(f"torchrun exited with {res.returncode}\n" + errors(res))
    return res.stderr


def empty_checkpoint_cache(tmp_path: Path, monkeypatch) -> Path:
    """Point $LAZYNEURON_CACHE at a new folder that shares the real cache's models, corpora and
    compiled kernels but has no fitted checkpoints (fits made there never reach the user's cache)."""
    from lazyneuron.paths import cache_dir

    real = cache_dir()
    root = tmp_path / "cache"
    root.mkdir()
    for entry in real.iterdir():
        if entry.name != "checkpoints":
            (root / entry.name).symlink_to(entry, target_is_directory=entry.is_dir())
    monkeypatch.setenv("LAZYNEURON_CACHE", str(root))
    return root


def tiny_causal_lm(model_type: str = "llama", seed: int = 0, layers: int = 2) -> nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    kw = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128, head_dim=16)
    if model_type == "gpt2":
        kw = dict(vocab_size=128, n_embd=64, n_layer=layers, n_head=4, n_positions=128)
    if model_type == "phi3":
        kw["pad_token_id"] = 0
    cfg = AutoConfig.for_model(model_type, **kw)
    torch.manual_seed(seed)
    m = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():  # non-trivial norms so that centring / thresholds matter
        for n, p in m.named_parameters():
            if "norm" in n and p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    return m.eval()


def tiny_bert(seed: int = 0, classifier: bool = False) -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification, BertModel

    cfg = BertConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64)
    torch.manual_seed(seed)
    return (BertForSequenceClassification(cfg) if classifier else BertModel(cfg)).eval()


class _Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.mixer_in = nn.Linear(d, 3 * d)
        self.mixer_out = nn.Linear(d, d)
        self.ff1 = nn.Linear(d, 4 * d)
        self.ff2 = nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.mixer_in(x).chunk(3, -1)
        x = x + self.mixer_out(torch.softmax(q @ k.transpose(-1, -2), -1) @ v)
        return x + self.ff2(torch.relu(self.ff1(x)))


class UnknownNet(nn.Module):
    """A model no family table knows: generic discovery must find its blocks."""

    def __init__(self, d: int = 32, n: int = 3) -> None:
        super().__init__()
        self.emb = nn.Embedding(50, d)
        self.blocks = nn.ModuleList(_Block(d) for _ in range(n))
        self.head = nn.Linear(d, 50)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.emb(input_ids)
        for b in self.blocks:
            x = b(x)
        return self.head(x)


@pytest.fixture
def llama() -> nn.Module:
    return tiny_causal_lm("llama")


@pytest.fixture
def ids() -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 128, (2, 24), generator=g)


def fff_tree(depth: int, d: int, o: int, dtype: torch.dtype = torch.float32, seed: int = 0, bias: bool = True, device: str = "cpu"):
    """Random FFF tree weights (w_in, b_in, w_out, b_out) of the given depth and widths, on ``device``."""
    g = torch.Generator().manual_seed(seed)
    n = (2 << depth) - 1
    w_in = torch.randn(n, d, generator=g).to(dtype)
    w_out = torch.randn(n, o, generator=g).to(dtype)
    b_in = torch.randn(n, generator=g) if bias else None
    b_out = torch.randn(o, generator=g) if bias else None
    return tuple(None if t is None else t.to(device) for t in (w_in, b_in, w_out, b_out))


def calib_batches(n: int = 6, seq: int = 32, vocab: int = 128, seed: int = 2) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (1, seq), generator=g) for _ in range(n)]


def assert_restored(m: nn.Module, before: dict[str, torch.Tensor]) -> None:
    """After revert_: no lazy module left and the exact state dict (contiguous) again."""
    from lazyneuron.surgery import LazyModule

    assert not any(isinstance(x, LazyModule) for x in m.modules())
    after = m.state_dict()
    assert after.keys() == before.keys()
    for k, v in before.items():
        assert torch.equal(after[k], v), k
        assert after[k].is_contiguous(), k
