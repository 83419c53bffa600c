"""perres_core's gradient checkpointing and out-of-memory recognition on small modules (no host needed)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from perres_core.grad_checkpoint import outermost_compute_modules, recompute_in_backward
from perres_core.memory import is_out_of_memory


class Block(nn.Module):
    """Stands for a ResBlock: a module whose forward takes extra arguments, called by its parent."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.inner = nn.Linear(width, width)
        self.calls = 0

    def forward(self, x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        self.calls += 1
        return torch.tanh(self.inner(x)) * scale


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Linear(8, 8)
        self.blocks = nn.ModuleList([nn.Sequential(Block(8), Block(8)), Block(8)])
        self.head = nn.Linear(8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for block in self.blocks:
            children = block.children() if isinstance(block, nn.Sequential) else [block]
            for child in children:  # like ComfyUI's UNet, which calls a TimestepEmbedSequential's children
                x = child(x, scale=0.5)
        return self.head(x)


def test_outermost_compute_modules_descend_through_containers_only():
    net = Net()
    found = outermost_compute_modules(net)
    assert found == [net.stem, net.blocks[0][0], net.blocks[0][1], net.blocks[1], net.head]


def test_checkpointing_gives_the_same_gradients_and_recomputes_each_block_once():
    torch.manual_seed(0)
    net = Net()
    x = torch.randn(4, 8)
    blocks = [m for m in outermost_compute_modules(net) if isinstance(m, Block)]

    def gradients() -> list[torch.Tensor]:
        net.zero_grad(set_to_none=True)
        net(x).sum().backward()
        return [p.grad.clone() for p in net.parameters()]

    plain = gradients()
    calls_plain = [b.calls for b in blocks]
    with recompute_in_backward(blocks) as count:
        assert count == 3
        checkpointed = gradients()
    calls_checkpointed = [b.calls - c for b, c in zip(blocks, calls_plain)]
    for a, b in zip(plain, checkpointed):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert calls_plain == [1, 1, 1] and calls_checkpointed == [2, 2, 2], "each block runs again in backward"
    assert all("forward" not in b.__dict__ for b in blocks), "the original forward is restored"


def test_checkpointing_is_undone_on_error_and_skipped_without_grad():
    net = Net()
    block = net.blocks[1]
    with pytest.raises(RuntimeError, match="boom"):
        with recompute_in_backward([block]):
            assert "forward" in block.__dict__
            raise RuntimeError("boom")
    assert "forward" not in block.__dict__
    with recompute_in_backward([block]), torch.no_grad():
        net(torch.randn(2, 8))
    assert block.calls == 1


def test_a_module_already_wrapped_by_someone_else_is_left_alone():
    block = Block(4)
    own = block.forward
    block.forward = lambda *a, **k: own(*a, **k)  # another pack's wrapper
    theirs = block.__dict__["forward"]
    with recompute_in_backward([block]) as count:
        assert count == 0
    assert block.__dict__["forward"] is theirs


@pytest.mark.parametrize("exc, expected", [
    (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), True),
    (RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: "
                  "you tried to allocate 17179869184 bytes."), True),
    (RuntimeError("MPS backend out of memory (MPS allocated: 8.00 GB)"), True),
    (MemoryError(), True),
    (RuntimeError("mat1 and mat2 shapes cannot be multiplied"), False),
    (ValueError("out of memory"), False),
])
def test_is_out_of_memory(exc, expected):
    assert is_out_of_memory(exc) is expected
