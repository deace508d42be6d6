"""LoRA under DeepSpeed ZeRO-3 on 2 CPU processes (gloo) against the same run on one process (issue 15).

The 2-process run uses gradient checkpointing as well; the chunked log-probs run in chunks of 8 label tokens, so the
ranks hold different numbers of chunks (each must still issue the same collectives). Both runs see the same
global batch (8 pairs per step), so every step's loss, the trained adapters and the merged weights must agree.
"""

from __future__ import annotations

import pytest
import torch

from tests.conftest import comparison_flags, launch, python_command, read_metrics, torchrun_command

# fp32 on both sides; the only differences are the order of float sums (gradient reduce-scatter across 2 ranks).
LOSS_ATOL = 1e-5
WEIGHT_ATOL = 1e-5


@pytest.mark.slow
def test_lora_zero3_two_processes_match_one_process(tiny_model_dir, synthetic_data, tmp_path):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    train, _ = synthetic_data

    flags = comparison_flags(
        tiny_model_dir,
        train,
        32,
        use_lora="true",
        lora_rank="8",
        lora_dropout="0.0",
        merge_lora="true",
        logprob_chunk_size="8",  # several chunks, a different number on each rank
    )

    one, two = tmp_path / "one", tmp_path / "two"
    launch(python_command(flags(one, 8)), tmp_path / "cache1")
    launch(torchrun_command(flags(two, 4, zero_stage="3", gradient_checkpointing="true")), tmp_path / "cache2")

    expected = [row["train_loss"] for row in read_metrics(one)]
    losses = [row["train_loss"] for row in read_metrics(two)]
    assert len(losses) == len(expected) == 4
    assert max(abs(a - b) for a, b in zip(losses, expected)) < LOSS_ATOL, (losses, expected)
    assert len({round(x, 4) for x in losses}) > 2  # the loss moves: a run that did not train cannot pass

    # The adapters load with peft and equal the one-process adapters; they trained (lora_B starts at zero).
    adapters_one = load_file(one / "adapter_model.safetensors")
    adapters_two = load_file(two / "adapter_model.safetensors")
    assert adapters_one.keys() == adapters_two.keys() and any("lora_B" in k for k in adapters_two)
    for name, value in adapters_one.items():
        torch.testing.assert_close(adapters_two[name], value, rtol=0, atol=WEIGHT_ATOL, msg=name)
    assert any(v.abs().max() > 0 for k, v in adapters_two.items() if "lora_B" in k)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    loaded = PeftModel.from_pretrained(base, two)
    lora_b = [p for n, p in loaded.named_parameters() if "lora_B" in n]
    assert lora_b and all(p.shape[1] == 8 for p in lora_b)

    # The merged models load with transformers, hold full (not partitioned) weights and equal each other.
    merged_one = AutoModelForCausalLM.from_pretrained(one / "merged", dtype=torch.float32).state_dict()
    merged_two = AutoModelForCausalLM.from_pretrained(two / "merged", dtype=torch.float32).state_dict()
    original = load_file(tiny_model_dir / "model.safetensors")
    assert merged_two.keys() == merged_one.keys()
    for name, value in merged_one.items():
        assert merged_two[name].shape == value.shape, name
        torch.testing.assert_close(merged_two[name], value, rtol=0, atol=WEIGHT_ATOL, msg=name)
    moved = [n for n, v in original.items() if not torch.equal(merged_two[n], v)]
    assert any("q_proj" in n for n in moved) and not any("embed" in n or "norm" in n for n in moved)
