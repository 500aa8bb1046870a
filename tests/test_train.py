"""The shared training loop: learning, resumable safetensors checkpoints, torchrun / DDP on CPU,
and the text classifier's checkpoints."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_bert, torchrun_worker
from torch import nn

import lazyneuron as ln
from lazyneuron.tasks import TextClassifier
from lazyneuron.train import fit


def _problem(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(8, 3, generator=g)
    xs = [torch.randn(16, 8, generator=g) for _ in range(12)]
    return [(x, x @ w) for x in xs]


def _loss(model: nn.Module, b) -> torch.Tensor:
    x, y = b
    return ((model(x) - y) ** 2).mean()


def test_fit_learns() -> None:
    torch.manual_seed(0)
    m = nn.Linear(8, 3)
    data = _problem()
    before = sum(float(_loss(m, b).detach()) for b in data)
    r = fit(m, _loss, data, epochs=20, lr=5e-2, progress=False)
    assert r.steps == 240 and sum(float(_loss(m, b).detach()) for b in data) < 0.05 * before


def test_fit_resumes_bit_exactly(tmp_path) -> None:
    data = _problem()
    torch.manual_seed(0)
    straight = nn.Linear(8, 3)
    init = {k: v.clone() for k, v in straight.state_dict().items()}
    fit(straight, _loss, data, epochs=2, lr=1e-2, progress=False)

    ck = tmp_path / "run.safetensors"
    m = nn.Linear(8, 3)
    m.load_state_dict(init)
    calls = {"n": 0}

    def crashing(model, b):
        calls["n"] += 1
        if calls["n"] == 15:
            raise KeyboardInterrupt  # the run is stopped after the step-10 checkpoint
        return _loss(model, b)

    with pytest.raises(KeyboardInterrupt):
        fit(m, crashing, data, epochs=2, lr=1e-2, checkpoint=ck, save_every=10, progress=False)
    m2 = nn.Linear(8, 3)
    m2.load_state_dict(init)
    r = fit(m2, _loss, data, epochs=2, lr=1e-2, checkpoint=ck, save_every=10, progress=False)
    assert r.resumed_from == 10 and r.steps == 24
    for a, b in zip(m2.parameters(), straight.parameters()):
        assert torch.allclose(a, b, atol=1e-7)


def test_fit_errors() -> None:
    m = nn.Linear(8, 3)
    with pytest.raises(ln.ConfigError, match="no batches"):
        fit(m, _loss, [], progress=False)
    for p in m.parameters():
        p.requires_grad_(False)
    with pytest.raises(ln.ConfigError, match="nothing to train"):
        fit(m, _loss, _problem(), progress=False)
    m2 = nn.Linear(8, 3)
    with pytest.raises(ln.ConfigError, match="loss became"):
        fit(m2, lambda mod, b: _loss(mod, b) * float("nan"), _problem(), progress=False)


def test_checkpoint_of_another_run_is_refused(tmp_path) -> None:
    ck = tmp_path / "a.safetensors"
    fit(nn.Linear(8, 3), _loss, _problem(), checkpoint=ck, progress=False)
    with pytest.raises(ln.ConfigError, match="another run"):
        fit(nn.Sequential(nn.Linear(8, 3)), _loss, _problem(), checkpoint=ck, progress=False)


def test_torchrun_two_processes_on_cpu(tmp_path) -> None:
    """DDP (gloo) with 2 processes: both ranks end with the same weights, rank 0 writes the checkpoint."""
    torchrun_worker(tmp_path)
    w0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    w1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert torch.equal(w0, w1)
    assert (tmp_path / "ckpt.safetensors").exists()


def test_torchrun_rank_failing_mid_training_stops_the_run(tmp_path) -> None:
    """A rank raising while its peer waits in the all-reduce: the run ends with the error (the
    teardown at exit must not pair a barrier with that all-reduce and hang)."""
    err = torchrun_worker(tmp_path, "fail", timeout=120, fails=True)
    assert "boom on rank 1" in err


def test_classifier_checkpoint_round_trip(tmp_path) -> None:
    enc = tiny_bert()
    clf = TextClassifier(enc, 2).eval()
    ids = torch.randint(0, 128, (3, 9))
    mask = torch.ones_like(ids)
    mask[0, 5:] = 0
    y = clf(ids, mask)
    clf.save(tmp_path / "c.safetensors")
    back = TextClassifier.load(tmp_path / "c.safetensors", tiny_bert(seed=5)).eval()
    assert torch.equal(back(ids, mask), y)
    with pytest.raises(ln.ConfigError, match="does not exist"):
        TextClassifier.load(tmp_path / "nope.safetensors", tiny_bert())
    (tmp_path / "bad.safetensors").write_bytes(b"junk" * 10)
    with pytest.raises(ln.ConfigError, match="readable"):
        TextClassifier.load(tmp_path / "bad.safetensors", tiny_bert())
    assert ln.adapters.get_adapter(clf).family == "bert"  # methods see an ordinary BERT
