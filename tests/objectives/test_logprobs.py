"""The log-prob implementations agree (values and gradients), on padded and all-masked rows; pair forwards agree."""

from __future__ import annotations

import pytest
import torch

from open_instruct.data.tokenize import IGNORE_INDEX
from open_instruct.model.liger import resolve_logprob_impl
from open_instruct.objectives.logprobs import chunked_logprobs, full_logprobs, sequence_logprobs, supports_chunked
from open_instruct.objectives.pair_logprobs import pair_logprobs
from tests.model_helpers import VOCAB, tiny_llama


@pytest.fixture(scope="module")
def model():
    """A randomly initialised tiny Llama in fp32 (untied head, so both embeddings get their own gradient)."""
    return tiny_llama().eval()  # eval: no dropout, so two forwards are comparable


def make_batch(seed: int = 0) -> dict[str, torch.Tensor]:
    """Right-padded ``[6, 16]`` batch: 3 chosen rows then 3 rejected; row 1 fully padded after 5 tokens, row 4 has no
    label at all (all masked), labels start after a prompt of varying length; the rejected half is shorter."""
    g = torch.Generator().manual_seed(seed)
    n, length = 6, 16
    lengths = torch.tensor([16, 5, 12, 9, 14, 11])  # rejected half: 14 at most
    prompts = torch.tensor([3, 2, 6, 4, 14, 1])
    input_ids = torch.randint(1, VOCAB, (n, length), generator=g)
    position = torch.arange(length)
    attention = (position < lengths[:, None]).long()
    labels = torch.where((position >= prompts[:, None]) & (attention == 1), input_ids, IGNORE_INDEX)
    labels[4] = IGNORE_INDEX
    input_ids = torch.where(attention == 1, input_ids, 0)
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels, "index": torch.arange(3)}


def independent_logprobs(model, batch) -> torch.Tensor:
    """Per-row summed label log-probs ``[N]`` in fp64, one position at a time."""
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.double()
    sums = []
    for row in range(logits.shape[0]):
        total = torch.zeros((), dtype=torch.float64)
        for t in range(1, logits.shape[1]):
            target = int(batch["labels"][row, t])
            if target != IGNORE_INDEX:
                total = total + torch.log_softmax(logits[row, t - 1], -1)[target]
        sums.append(total)
    return torch.stack(sums)


def values_and_grads(model, fn, batch):
    """(sums, counts, means, gradient of a mixed objective for every parameter)."""
    model.zero_grad(set_to_none=True)
    lp = fn(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
    weights = torch.linspace(0.5, 1.5, lp.sums.shape[0])
    ((lp.sums * weights).sum() + lp.means.sum()).backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return lp.sums.detach(), lp.counts, lp.means.detach(), grads


def test_full_matches_an_independent_computation(model):
    batch = make_batch(1)
    lp = full_logprobs(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
    torch.testing.assert_close(lp.sums.double(), independent_logprobs(model, batch), rtol=1e-5, atol=1e-5)
    assert lp.counts.tolist() == (batch["labels"][:, 1:] != IGNORE_INDEX).sum(-1).tolist()


@pytest.mark.parametrize("chunk_size", [1, 7, 4096])
def test_chunked_matches_full_values_and_gradients(model, chunk_size):
    batch = make_batch(2)
    full = values_and_grads(model, full_logprobs, batch)

    def chunked(m, *args):
        return chunked_logprobs(m, *args, chunk_size=chunk_size)

    ours = values_and_grads(model, chunked, batch)
    torch.testing.assert_close(ours[0], full[0], rtol=1e-5, atol=1e-5)
    assert torch.equal(ours[1], full[1])
    torch.testing.assert_close(ours[2], full[2], rtol=1e-5, atol=1e-5)
    assert ours[3].keys() == full[3].keys() and "lm_head.weight" in ours[3]
    for name in full[3]:
        torch.testing.assert_close(ours[3][name], full[3][name], rtol=1e-5, atol=1e-5, msg=name)


def test_all_masked_row_is_zero_and_finite(model):
    batch = make_batch(3)
    for fn in (full_logprobs, chunked_logprobs):
        sums, counts, means, grads = values_and_grads(model, fn, batch)
        assert counts[4] == 0 and sums[4] == 0 and means[4] == 0
        assert all(torch.isfinite(g).all() for g in grads.values())


def test_no_label_in_the_whole_batch_still_backpropagates(model):
    batch = make_batch(4)
    batch["labels"][:] = IGNORE_INDEX
    lp = chunked_logprobs(model, batch["input_ids"], batch["attention_mask"], batch["labels"], chunk_size=4)
    assert lp.sums.tolist() == [0.0] * 6 and lp.sums.requires_grad
    lp.means.sum().backward()


def test_separate_forward_matches_concatenated(model):
    batch = make_batch(5)

    def logprob_fn(m, b):
        return sequence_logprobs(m, b["input_ids"], b["attention_mask"], b["labels"], chunk_size=5)

    results = []
    for separate in (False, True):
        model.zero_grad(set_to_none=True)
        lp = pair_logprobs(model, batch, logprob_fn, separate_forward=separate)
        (lp.sums.sum() + lp.means.sum()).backward()
        results.append((lp, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (joint, joint_grads), (split, split_grads) = results
    torch.testing.assert_close(split.sums, joint.sums, rtol=1e-5, atol=1e-5)
    assert torch.equal(split.counts, joint.counts) and torch.equal(split.token_seq, joint.token_seq)
    torch.testing.assert_close(split.token_logps, joint.token_logps, rtol=1e-5, atol=1e-5)
    for name in joint_grads:
        torch.testing.assert_close(split_grads[name], joint_grads[name], rtol=1e-5, atol=1e-5, msg=name)


def test_softcapped_models_use_the_full_path(model):
    batch = make_batch(6)
    model.config.final_logit_softcapping = 30.0
    try:
        assert not supports_chunked(model)
        lp = sequence_logprobs(model, batch["input_ids"], batch["attention_mask"], batch["labels"], impl="chunked")
        ref = full_logprobs(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
        assert torch.equal(lp.sums, ref.sums)
    finally:
        model.config.final_logit_softcapping = None
    with pytest.raises(ValueError, match="unknown log-prob implementation"):
        sequence_logprobs(model, batch["input_ids"], batch["attention_mask"], batch["labels"], impl="fast")


def test_liger_flag_without_cuda_falls_back_to_chunked(model, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    messages = []
    assert resolve_logprob_impl(True, model, "cpu", messages.append) == "chunked"
    assert messages == [
        "note: --use_liger_kernel: Liger's Triton kernels need a CUDA device (or TRITON_INTERPRET=1 on CPU) and this "
        "run has none; log-probs use the chunked path (pure PyTorch, same values)"
    ]
    assert resolve_logprob_impl(False, model, "cpu", messages.append) == "chunked" and len(messages) == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="Liger's kernels need CUDA")
def test_liger_matches_chunked_on_cuda():
    from transformers import LlamaForCausalLM

    from open_instruct.model.liger import apply_liger_kernels
    from open_instruct.objectives.logprobs import liger_logprobs

    plain = tiny_llama(hidden_size=64, intermediate_size=128, max_position_embeddings=2048).cuda().eval()
    patched = LlamaForCausalLM(plain.config).cuda().eval()
    patched.load_state_dict(plain.state_dict())
    apply_liger_kernels(patched)
    batch = {k: v.cuda() for k, v in make_batch(7).items()}
    ref = values_and_grads(plain, chunked_logprobs, batch)
    ours = values_and_grads(patched, liger_logprobs, batch)
    torch.testing.assert_close(ours[0], ref[0], rtol=1e-4, atol=1e-4)
    for name in ref[3]:
        torch.testing.assert_close(ours[3][name], ref[3][name], rtol=1e-4, atol=1e-4, msg=name)


def test_default_chunk_keeps_logits_bounded_for_any_vocabulary():
    from open_instruct.objectives.logprobs import CHUNK_LOGITS_BUDGET, MIN_CHUNK_TOKENS, auto_chunk_size

    for vocab in (1024, 8192, 32000):  # up to ~32k the logit budget decides
        chunk = auto_chunk_size(vocab)
        assert chunk * vocab <= CHUNK_LOGITS_BUDGET < (chunk + 1) * vocab
    for vocab in (128256, 256000):  # larger ones: the floor decides (the head's weight is read once per chunk)
        assert auto_chunk_size(vocab) == MIN_CHUNK_TOKENS
    assert auto_chunk_size(8192) == 256 and auto_chunk_size(32000) == 65 and auto_chunk_size(128256) == 32
    assert auto_chunk_size(10**9) == 32  # never degenerates to single tokens


def test_default_chunk_matches_explicit_chunk(model):
    from open_instruct.objectives.logprobs import auto_chunk_size

    batch = make_batch()
    auto = chunked_logprobs(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
    explicit = chunked_logprobs(
        model,
        batch["input_ids"],
        batch["attention_mask"],
        batch["labels"],
        chunk_size=auto_chunk_size(model.config.vocab_size),
    )
    torch.testing.assert_close(auto.sums, explicit.sums, rtol=0, atol=0)
