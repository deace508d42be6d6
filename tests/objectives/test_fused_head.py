"""The fused Liger head (open_instruct/objectives/fused_head.py): run as the output layer's own forward, it equals
the chunked log-probs and their gradients, also when the layer's weight is whole only inside that forward (as
ZeRO-3 and FSDP2 leave it); and when the run chooses it, with one ``note:`` line where it cannot run.

The kernel itself runs on CPU only through Triton's interpreter, chosen before Liger's kernels are first imported,
so those cases run in a subprocess (tests/fused_head_interpreted.py).
"""

from __future__ import annotations

import pytest
import torch

from open_instruct.model import liger
from open_instruct.model.liger import INTERPRETER_NOTE, resolve_logprob_impl
from open_instruct.objectives.fused_head import as_head_forward
from open_instruct.objectives.logprobs import LabelTokens, chunked_logprobs, logprobs_line
from tests.conftest import run_interpreted
from tests.model_helpers import padded_rows, tiny_llama

# fp32, relative: measured 5.7e-8 (log-probs) and 3.3e-7 (gradients) against the chunked path in 3-token chunks.
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def interpreted() -> dict:
    pytest.importorskip("liger_kernel")
    pytest.importorskip("triton")
    return run_interpreted("fused_head_interpreted.py", timeout=300)


def test_fused_head_equals_chunked_with_a_weight_whole_only_in_its_forward(interpreted):
    errors = interpreted["partitioned"]
    assert max(errors.values()) < TOLERANCE, errors
    assert interpreted["gathers_per_pass"] == 1  # the kernel ran inside the one call of the output layer
    assert interpreted["forward_restored"]


def test_fused_head_without_label_tokens_still_backpropagates(interpreted):
    assert interpreted["no_labels"]["sums"] == [0.0] * 4 and interpreted["no_labels"]["grads"] > 0


def test_as_head_forward_runs_inside_the_layer_call_and_puts_back_its_forward():
    model = tiny_llama().eval()
    b = padded_rows()
    head = model.get_output_embeddings()
    own = head.forward  # an instance-level forward, as a hook library installs: kept, and handed to the projection
    head.forward = own
    calls = []
    head.register_forward_pre_hook(lambda _m, args: calls.append(args[0].shape))
    tokens = LabelTokens.of(b["labels"])

    def project(forward, hidden):
        logits = forward(tokens.select(hidden)).float()
        return logits.gather(-1, tokens.targets.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)

    got = as_head_forward(model, b["input_ids"], b["attention_mask"], project)
    expected = chunked_logprobs(model, b["input_ids"], b["attention_mask"], b["labels"]).token_logps
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    assert calls == [torch.Size([*b["input_ids"].shape, model.config.hidden_size])]  # all positions, one call
    assert head.__dict__["forward"] is own


def test_logprobs_line_names_each_pass():
    model = tiny_llama()
    assert logprobs_line(model, "liger") == (
        "logprobs: no-grad passes (reference, evaluation) chunked projection of the label positions; training "
        "passes liger fused linear cross-entropy, run as the output layer's own forward (its weight is whole on "
        "every rank)"
    )
    assert logprobs_line(model, "chunked").endswith("training passes chunked projection of the label positions")
    assert "WPO weights need the logits" in logprobs_line(model, "liger", with_sum_sq=True)
    assert logprobs_line(model, "full").startswith("logprobs: full logits on every pass")


def test_interpreter_on_cpu_chooses_the_fused_kernel_only(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    model, messages = tiny_llama(), []
    norm_type = type(model.model.norm)
    assert resolve_logprob_impl(True, model, "cpu", messages.append) == "liger"
    assert messages == [INTERPRETER_NOTE]
    assert type(model.model.norm) is norm_type  # Liger's RMSNorm fails under the interpreter: not patched in


def test_old_liger_kernel_falls_back_with_what_to_upgrade(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(liger, "version", lambda name: "0.8.1")
    messages = []
    assert resolve_logprob_impl(True, tiny_llama(), "cpu", messages.append) == "chunked"
    assert len(messages) == 1 and messages[0].startswith("note: --use_liger_kernel: liger-kernel 0.8.1 ")
    assert "upgrade: pip install 'liger-kernel>=0.8.2'; log-probs use the chunked path" in messages[0]


def test_cpu_without_interpreter_falls_back_with_one_note(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    messages = []
    assert resolve_logprob_impl(True, tiny_llama(), "cpu", messages.append) == "chunked"
    assert len(messages) == 1 and messages[0].startswith("note: --use_liger_kernel: Liger's Triton kernels need")
