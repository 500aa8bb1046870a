"""Launched under `torch.distributed.run --nproc_per_node 2` by conftest.torchrun_worker (the tests
in test_train.py and test_gating.py)."""

import itertools
import sys
from pathlib import Path

import torch
from torch import nn

from lazyneuron.train import fit, shutdown, world


def gates(out: Path, rank: int) -> None:
    """Gate training under DDP: both ranks must end with the same predictor."""
    sys.path.insert(0, str(Path(__file__).parent))
    from conftest import tiny_causal_lm

    from lazyneuron.methods.gating import GateTraining, train_gates

    m = tiny_causal_lm("llama", layers=3)
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randint(0, 128, (4, 16), generator=g), {"domain": ["a", "b", "a", "b"]}) for _ in range(6)]
    torch.manual_seed(rank)
    pred = train_gates(m, batches, {"domain": ["a", "b"]}, GateTraining(target=0.3, epochs=2), gate_tokens=8, progress=False,
                       seed=0, out=out / "gates.safetensors")
    torch.save(torch.cat([p.detach().flatten() for p in pred.parameters()]), out / f"rank{rank}.pt")


def main() -> None:
    out = Path(sys.argv[1])
    rank, n = world()
    assert n == 2, n
    if len(sys.argv) > 2 and sys.argv[2] == "gates":
        gates(out, rank)  # the process group is ended by the teardown world() registered at exit
        return
    if len(sys.argv) > 2 and sys.argv[2] == "fail":
        # rank 1 fails mid-training while rank 0 waits in the gradient all-reduce: the run must
        # stop with the error, not hang in the teardown
        m = nn.Linear(8, 3)
        data = [torch.randn(4, 8) for _ in range(8)]

        def loss(mod: nn.Module, x: torch.Tensor) -> torch.Tensor:
            if rank == 1 and next(calls) == 2:
                raise ValueError("boom on rank 1")
            return mod(x).pow(2).mean()

        calls = itertools.count()
        fit(m, loss, data, epochs=2, progress=False)
        return
    torch.manual_seed(rank)  # different initial weights per rank: DDP must broadcast rank 0's
    m = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    g = torch.Generator().manual_seed(0)
    w = torch.randn(8, 3, generator=g)
    data = [(x, x @ w) for x in (torch.randn(8, 8, generator=g) for _ in range(10))]
    fit(m, lambda mod, b: ((mod(b[0]) - b[1]) ** 2).mean(), data, epochs=2, lr=1e-2, checkpoint=out / "ckpt.safetensors", progress=False)
    torch.save(torch.cat([p.detach().flatten() for p in m.parameters()]), out / f"rank{rank}.pt")
    shutdown()


if __name__ == "__main__":
    main()
