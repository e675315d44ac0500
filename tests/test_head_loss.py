"""The fused, chunked head loss computes what the plain linear + cross-entropy computes, gradients included."""

import pytest
import torch
import torch.nn.functional as F

from tokenmill.model import head_loss
from tokenmill.model.head_loss import linear_cross_entropy


def plain(hidden, weight, targets):
    logits = F.linear(hidden, weight).float()
    return F.cross_entropy(logits.flatten(0, -2), targets.flatten(), ignore_index=-1, reduction="none").view_as(targets)


@pytest.mark.parametrize("chunk_elements", [1 << 10, 3 * 333, 1 << 30])  # many chunks, a ragged last one, one chunk
def test_loss_and_gradients_match_the_plain_head(monkeypatch, chunk_elements):
    monkeypatch.setattr(head_loss, "CHUNK_ELEMENTS", chunk_elements)
    torch.manual_seed(0)
    hidden = torch.randn(3, 37, 16, requires_grad=True)
    weight = torch.randn(333, 16, requires_grad=True)
    targets = torch.randint(0, 333, (3, 37))
    targets[0, :5] = -1  # ignored: 0 loss, no gradient
    upstream = torch.rand(3, 37)  # per-token weights, as the loop's sequence weighting makes

    got = linear_cross_entropy(hidden, weight, targets)
    grads = torch.autograd.grad((got * upstream).sum(), (hidden, weight))
    want = plain(hidden, weight, targets)
    want_grads = torch.autograd.grad((want * upstream).sum(), (hidden, weight))

    assert got.shape == targets.shape and got.dtype == torch.float32
    torch.testing.assert_close(got, want)
    assert torch.all(got[0, :5] == 0)
    for g, w in zip(grads, want_grads):
        torch.testing.assert_close(g, w)
    assert grads[0][0, :5].abs().max() == 0


def test_without_gradients_it_keeps_no_logits_and_scores_the_same():
    torch.manual_seed(1)
    hidden, weight = torch.randn(64, 8), torch.randn(50, 8)
    targets = torch.randint(0, 50, (64,))
    with torch.no_grad():
        torch.testing.assert_close(linear_cross_entropy(hidden, weight, targets), plain(hidden, weight, targets))


def test_a_tied_weight_gets_both_gradients():
    """A tied head and embedding: the head's gradient adds to the embedding's, as with nn.Linear."""
    torch.manual_seed(2)
    table = torch.randn(40, 8, requires_grad=True)
    idx = torch.randint(0, 40, (4, 9))
    hidden = F.embedding(idx, table)
    grads = []
    for loss_fn in (linear_cross_entropy, plain):
        table.grad = None
        loss_fn(F.embedding(idx, table), table, idx.roll(-1, 1)).mean().backward()
        grads.append(table.grad.clone())
    torch.testing.assert_close(grads[0], grads[1])
    assert hidden.shape == (4, 9, 8)


def test_bf16_autocast_on_cpu_stays_close():
    torch.manual_seed(3)
    hidden = torch.randn(32, 64, requires_grad=True)
    weight = torch.randn(128, 64, requires_grad=True)
    targets = torch.randint(0, 128, (32,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = linear_cross_entropy(hidden, weight, targets)
        want = plain(hidden, weight, targets)
    torch.testing.assert_close(got, want, atol=0.05, rtol=0.02)
    got.sum().backward()
    assert hidden.grad.dtype == torch.float32 and weight.grad.dtype == torch.float32


def test_the_gradient_buffer_is_reused_only_once_its_graph_is_gone():
    """Each step reuses the last step's [tokens, vocab] buffer (no fresh mapping and page faults), but never
    one a live graph still holds, so a retained graph's backward reads what its own forward wrote."""
    torch.manual_seed(4)
    hidden = torch.randn(64, 8, requires_grad=True)
    weight = torch.randn(50, 8, requires_grad=True)
    targets = torch.randint(0, 50, (64,))

    def saved_buffer(loss):
        return loss.grad_fn.next_functions[0][0].saved_tensors[2].data_ptr()  # under the view to lead shape

    first = linear_cross_entropy(hidden, weight, targets)
    first_ptr = saved_buffer(first)
    first.sum().backward()
    second = linear_cross_entropy(hidden, weight, targets)
    assert saved_buffer(second) == first_ptr  # the graph of the first is gone: same buffer

    third = linear_cross_entropy(hidden, weight, targets)  # the second's graph is alive: a buffer of its own
    assert saved_buffer(third) != saved_buffer(second)
    hidden.grad = None
    second.sum().backward()
    want = torch.autograd.grad(plain(hidden, weight, targets).sum(), hidden)[0]
    torch.testing.assert_close(hidden.grad, want)
    del third
