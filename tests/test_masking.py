"""Document masking: the dense mask (SDPA, CPU) and the FlexAttention block mask (CUDA) agree.

FlexAttention runs on CPU in eager mode (forward only: it has no CPU backward), so the CPU tests compare
the two backends' forward passes; inductor's CPU compile of it takes half a minute cold, so the compiled
graphs are checked here with the aot_eager backend (graph capture, no codegen) and with inductor on a GPU.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch.nn.attention.flex_attention import BlockMask, create_mask

from tokenmill.model import Llama, ModelConfig, masking
from tokenmill.model.masking import (attention_backend, build_document_mask, document_block_mask, document_ids,
                                     document_mask, document_mask_mod)

VOCAB = 256
EOS = 0


def tiny(**overrides) -> ModelConfig:
    return ModelConfig(**{"preset": "tiny", "vocab_size": VOCAB, "eos_id": EOS, **overrides})


def packed_batch(T: int = 160, seed: int = 0) -> torch.Tensor:
    """Rows of the shapes packing makes: several documents (one of them empty: two EOS in a row), no EOS
    at all, EOS first and last, and documents meeting at a 128-token block boundary."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(1, VOCAB, (4, T), generator=g)
    idx[0, [5, 30, 31, 100]] = EOS
    idx[2, [0, T - 1]] = EOS
    idx[3, [127, 128]] = EOS
    return idx


@pytest.fixture
def quiet():
    """FlexAttention warns that uncompiled it is a reference path: that is what these CPU tests want."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile")
        yield


def test_document_ids_close_each_document_at_its_eos():
    idx = torch.tensor([[5, EOS, 7, EOS, EOS, 9], [1, 2, 3, 4, 5, 6]])
    assert document_ids(idx, EOS).tolist() == [[0, 0, 1, 1, 2, 3], [0, 0, 0, 0, 0, 0]]
    mask = document_mask(idx, EOS)
    assert mask.shape == (2, 1, 6, 6) and mask.dtype == torch.bool
    expected = [[q >= k and document_ids(idx, EOS)[b, q] == document_ids(idx, EOS)[b, k] for k in range(6)]
                for b in range(2) for q in range(6)]
    assert mask.squeeze(1).reshape(12, 6).tolist() == expected


def test_mask_mod_evaluates_to_the_dense_document_mask():
    idx = packed_batch()
    B, T = idx.shape
    dense = create_mask(document_mask_mod(document_ids(idx, EOS)), B, 1, T, T, device="cpu")
    assert torch.equal(dense, document_mask(idx, EOS))


def test_block_mask_skips_blocks_across_documents():
    idx = packed_batch(T=256)
    block_mask = document_block_mask(idx, EOS)
    assert isinstance(block_mask, BlockMask) and block_mask.shape == (4, 1, 256, 256)
    # kv blocks each 128-query block visits, partial and full: the second query block of row 3 starts a
    # document at 128 (EOS at 127 and 128) and skips the first kv block; the row without EOS visits both.
    visited = block_mask.kv_num_blocks + block_mask.full_kv_num_blocks
    assert visited[1, 0].tolist() == [1, 2]
    assert visited[3, 0].tolist() == [1, 1]


def test_backend_follows_the_device(monkeypatch):
    assert attention_backend("cuda") == "flex" and attention_backend(torch.device("cuda:1")) == "flex"
    assert attention_backend("cpu") == "sdpa"
    idx = packed_batch()
    assert isinstance(build_document_mask(idx, EOS), torch.Tensor)
    assert isinstance(build_document_mask(idx, EOS, backend="flex"), BlockMask)
    monkeypatch.setattr(masking, "FORCE_BACKEND", "flex")
    assert attention_backend("cpu") == "flex" and isinstance(build_document_mask(idx, EOS), BlockMask)
    monkeypatch.setattr(masking, "FORCE_BACKEND", "sdpa")
    assert attention_backend("cuda") == "sdpa"
    # On CUDA flex_attention and create_block_mask are compiled once, on first use; elsewhere used as they are.
    monkeypatch.setattr(masking, "_compiled", {})
    flex = masking.flex_attention
    cuda = masking._maybe_compiled("flex_attention", flex, torch.device("cuda"))
    assert cuda is not flex and masking._maybe_compiled("flex_attention", flex, torch.device("cuda")) is cuda
    assert masking._maybe_compiled("flex_attention", flex, torch.device("cpu")) is flex


@pytest.mark.parametrize("n_kv_heads", [2, 4], ids=["gqa", "mha"])
def test_flex_backend_matches_the_dense_mask(monkeypatch, quiet, n_kv_heads):
    torch.manual_seed(0)
    model = Llama(tiny(n_kv_heads=n_kv_heads)).eval()
    idx = packed_batch()
    targets = torch.roll(idx, -1, dims=1)
    calls = []

    def counted_flex(*args, **kwargs):
        calls.append(kwargs["enable_gqa"])
        return flex(*args, **kwargs)

    flex = masking.flex_attention
    monkeypatch.setattr(masking, "flex_attention", counted_flex)
    with torch.no_grad():
        monkeypatch.setattr(masking, "FORCE_BACKEND", "sdpa")
        dense_logits, dense_loss = model(idx, doc_mask=True), model(idx, targets, doc_mask=True)[1]
        assert calls == []
        monkeypatch.setattr(masking, "FORCE_BACKEND", "flex")
        flex_logits, flex_loss = model(idx, doc_mask=True), model(idx, targets, doc_mask=True)[1]
    assert calls == [n_kv_heads != 4] * 2 * model.cfg.n_layers  # the flex path ran, once per layer
    torch.testing.assert_close(flex_logits, dense_logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(flex_loss, dense_loss)
    with torch.no_grad():
        plain = model(idx)
    assert (plain - dense_logits).abs().max() > 1e-2  # the documents really are masked


@pytest.mark.parametrize("whole", [False, True], ids=["per_block", "whole_model"])
def test_compiled_graphs_take_the_block_mask_as_an_input(monkeypatch, quiet, whole):
    """As ``train/parallelize.py`` compiles: each block with fullgraph (the block mask, built once in
    Llama.forward, is an input of every block's graph) or the whole model (its graph breaks where the
    mask is built, so the mask_mod never reads an intermediate of the graph). A new batch of the same
    shape, with other documents, reuses the graphs."""
    from torch._dynamo.testing import CompileCounterWithBackend
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    model = Llama(tiny()).eval()
    batches = [packed_batch(seed=0), packed_batch(seed=1)]
    batches[1][1, 60] = EOS  # other documents, same shape
    monkeypatch.setattr(masking, "FORCE_BACKEND", "sdpa")
    with torch.no_grad():
        expected = [model(idx, doc_mask=True) for idx in batches]
    counter = CompileCounterWithBackend("aot_eager")
    if whole:
        model.compile(backend=counter)
    else:
        for block in model.layers:
            block.compile(backend=counter, fullgraph=True)
    monkeypatch.setattr(masking, "FORCE_BACKEND", "flex")
    frames = []
    with torch.no_grad():
        for idx, want in zip(batches, expected):
            torch.testing.assert_close(model(idx, doc_mask=True), want, atol=1e-5, rtol=1e-5)
            frames.append(counter.frame_count)
    assert frames[0] > 0 and frames[1] == frames[0]  # no recompile for new documents
    if whole:  # the one graph break: the mask is built outside the model's graph
        assert [reason for reason in counters["graph_break"] if "document_block_mask" in reason]
    torch._dynamo.reset()


@pytest.fixture
def fp32_matmuls():
    """The training loop turns TF32 on for the whole process; these comparisons want full fp32."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    yield
    torch.set_float32_matmul_precision(before)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("setup", ["eager", "op_sac", "per_block", "whole_model"])
def test_cuda_flex_matches_the_dense_mask_forward_and_backward(monkeypatch, fp32_matmuls, setup):
    """On CUDA doc_mask runs FlexAttention by default: the module-level compiled flex_attention and
    create_block_mask in an eager model (also under op-level selective checkpointing), and inductor's
    lowering inside compiled blocks or a compiled model as train/parallelize.py applies them. The loss and
    every gradient (uncompiled, the logits too) match SDPA with the dense mask, in fp32, with GQA, head_dim
    64 and T not a multiple of the 128-token block, over two steps (the second reuses what was compiled)."""
    from tokenmill.train.parallelize import apply_activation_checkpointing, apply_compile

    device = torch.device("cuda")
    cfg = tiny(dim=256, n_heads=4, n_kv_heads=2)  # head_dim 64, as every preset has
    torch.manual_seed(0)
    reference = Llama(cfg).to(device)
    model = Llama(cfg).to(device)
    model.load_state_dict(reference.state_dict())
    if setup == "op_sac":
        apply_activation_checkpointing(model, "selective", "op")
    elif setup != "eager":
        apply_compile(model, per_block=setup == "per_block")
    idx = packed_batch(T=200).to(device)
    targets = torch.roll(idx, -1, dims=1)

    assert attention_backend(device) == "flex"
    assert isinstance(build_document_mask(idx, EOS), BlockMask)
    for step in range(2):  # the second step: graphs and compiled functions reused
        batch = idx if step == 0 else idx.roll(7, dims=1)
        monkeypatch.setattr(masking, "FORCE_BACKEND", "sdpa")
        want_loss = reference(batch, targets, doc_mask=True)[1]
        want_loss.backward()
        monkeypatch.setattr(masking, "FORCE_BACKEND", None)
        loss = model(batch, targets, doc_mask=True)[1]
        loss.backward()
        if setup in ("eager", "op_sac"):  # compiled, a logits-only forward would be one more graph to build
            with torch.no_grad():
                logits = model(batch, doc_mask=True)
            monkeypatch.setattr(masking, "FORCE_BACKEND", "sdpa")
            with torch.no_grad():
                torch.testing.assert_close(logits, reference(batch, doc_mask=True), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(loss, want_loss, atol=1e-5, rtol=1e-5)
        for (name, want), got in zip(reference.named_parameters(), model.parameters()):
            torch.testing.assert_close(got.grad, want.grad, atol=1e-5, rtol=1e-3, msg=name)
        reference.zero_grad(set_to_none=True)
        model.zero_grad(set_to_none=True)
