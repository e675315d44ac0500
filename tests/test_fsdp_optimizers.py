"""Muon and GaLore under FSDP2 (2 CPU processes, gloo): each sharded step is the whole-matrix step cut
into rows, and the state is as small as it honestly can be (Muon's momentum sharded like the weight,
GaLore's r-wide state replicated). Whole training runs under torchrun are in test_distributed.py."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from tokenmill.train.galore import GaLoreAdamW
from tokenmill.train.muon import Muon

# Uneven row counts over 2 ranks (3+2, 2+1, 1+0: rank 1 holds no row of the last) and a tall and a wide one.
SHAPES = [(5, 3), (3, 7), (8, 6), (1, 4)]
OPTIMIZERS = {
    "muon": (Muon, dict(lr=0.02, weight_decay=0.1, adjust_lr_fn="match_rms_adamw")),
    # rank 2 of these small sides; a refresh at steps 1 and 3 of 4
    "galore": (GaLoreAdamW, dict(lr=0.01, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, rank=2,
                                 update_proj_gap=2, scale=0.25)),
}
STEPS = 4


class _Matrices(nn.Module):
    """Parameters of ``SHAPES`` and a loss whose gradient differs at every step (the weights move)."""

    def __init__(self):
        super().__init__()
        self.weights = nn.ParameterList(nn.Parameter(torch.randn(shape)) for shape in SHAPES)

    def forward(self, targets: list[torch.Tensor]) -> torch.Tensor:
        return sum(((w - t) ** 3).sum() for w, t in zip(self.weights, targets))


def _steps(model: _Matrices, optimizer: torch.optim.Optimizer, targets: list[torch.Tensor]) -> None:
    for _ in range(STEPS):
        model(targets).backward()
        optimizer.step()
        optimizer.zero_grad()


def _sharded_worker(rank: int, store: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        mesh = init_device_mesh("cpu", (2,))
        for name, (kind, settings) in OPTIMIZERS.items():
            torch.manual_seed(0)  # the same weights and targets on both ranks, as in one process
            whole = _Matrices()
            targets = [torch.randn(shape) for shape in SHAPES]
            sharded = _Matrices()
            sharded.load_state_dict(whole.state_dict())
            fully_shard(sharded, mesh=mesh)  # both ranks' losses are the same: their mean gradient is one's
            whole_opt, sharded_opt = kind(whole.parameters(), **settings), kind(sharded.parameters(), **settings)
            _steps(whole, whole_opt, targets)
            _steps(sharded, sharded_opt, targets)
            for w, s in zip(whole.parameters(), sharded.parameters()):
                assert isinstance(s, DTensor)
                torch.testing.assert_close(s.full_tensor(), w, rtol=1e-6, atol=1e-6, msg=f"{name} {tuple(w.shape)}")
                for key, state in sharded_opt.state[s].items():
                    reference = whole_opt.state[w][key]
                    if name == "muon":  # the momentum is sharded exactly like the weight
                        assert isinstance(state, DTensor) and state.placements == s.placements
                        state = state.full_tensor()
                    else:  # GaLore's small state is whole, and the same on both ranks
                        assert not isinstance(state, DTensor)
                        gathered = [torch.empty_like(state) for _ in range(2)]
                        dist.all_gather(gathered, state.contiguous())
                        assert torch.equal(gathered[0], gathered[1]), (name, key)
                    torch.testing.assert_close(state, reference, rtol=1e-6, atol=1e-6, msg=f"{name} {key}")
    finally:
        dist.destroy_process_group()


def test_sharded_muon_and_galore_steps_are_the_whole_matrix_steps(tmp_path):
    mp.spawn(_sharded_worker, args=(str(tmp_path / "store"),), nprocs=2, join=True)
