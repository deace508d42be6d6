"""Forward passes within a micro-batch: groups of pairs in every layout equal the whole batch's rows, the ranks agree
on how many passes, and a run split into passes trains the same model as one pass per micro-batch."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from open_instruct.data.collate import PackedPairCollator, PaddedPairCollator, SharedPromptPairCollator
from open_instruct.errors import UserError
from open_instruct.model.packing import packed_sequence_logprobs, prepare_model_for_packing
from open_instruct.objectives.logprobs import sequence_logprobs
from open_instruct.training.forward_passes import ForwardSplitter, forward_budget, pair_costs, partition, take_pairs
from tests.conftest import read_metrics, run_cli, small_run_args
from tests.model.test_packing import load, random_records


def test_partition_cuts_at_equal_shares_and_never_leaves_a_group_empty():
    assert partition([10, 10, 10, 10], 2) == [(0, 2), (2, 4)]
    assert partition([30, 1, 1, 1], 2) == [(0, 1), (1, 4)]
    assert partition([1, 1, 1, 30], 3) == [(0, 2), (2, 3), (3, 4)]  # the last cuts are forced: one pair each
    assert partition([5, 5, 5], 3) == [(0, 1), (1, 2), (2, 3)]
    assert partition([7], 1) == [(0, 1)]
    for costs in ([3, 9, 1, 4, 4, 8, 2], [1] * 7, [50, 1, 1, 1, 1, 1, 50]):
        for groups in range(1, len(costs) + 1):
            ranges = partition(costs, groups)
            assert len(ranges) == groups and ranges[0][0] == 0 and ranges[-1][1] == len(costs)
            assert all(lo < hi for lo, hi in ranges) and all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))


@pytest.fixture(scope="module")
def records(tiny_model_dir):
    from transformers import AutoConfig

    return random_records(7, AutoConfig.from_pretrained(tiny_model_dir).vocab_size, seed=11)


def _logprobs(model, batch):
    if "cu_seq_lens" in batch:
        return packed_sequence_logprobs(model, batch)
    return sequence_logprobs(model, batch["input_ids"], batch["attention_mask"], batch["labels"])


@pytest.mark.parametrize("collate", [PaddedPairCollator(0), PackedPairCollator(), SharedPromptPairCollator()])
def test_groups_of_pairs_equal_the_whole_batch(tiny_model_dir, records, collate):
    """Each group's chosen and rejected log-probs and counts are the whole batch's for those pairs, in order."""
    model = load(tiny_model_dir, "sdpa")
    if not isinstance(collate, PaddedPairCollator):
        prepare_model_for_packing(model)
    batch = collate(records)
    whole = _logprobs(model, batch)
    b = len(records)
    costs = pair_costs(batch)
    assert len(costs) == b and all(c > 0 for c in costs)
    for lo, hi in partition(costs, 3):
        part = take_pairs(batch, lo, hi)
        got = _logprobs(model, part)
        want = torch.cat([whole.sums[lo:hi], whole.sums[b + lo : b + hi]])
        torch.testing.assert_close(got.sums, want, atol=1e-5, rtol=1e-5)
        assert got.counts.tolist() == torch.cat([whole.counts[lo:hi], whole.counts[b + lo : b + hi]]).tolist()
        assert part["index"].tolist() == list(range(lo, hi))
        assert sum(pair_costs(part)) <= sum(costs[lo:hi])


def test_ranks_agree_on_the_most_passes_any_needs_but_no_more_than_the_fewest_pairs():
    class TwoRanks:
        num_processes, device = 2, torch.device("cpu")

        def __init__(self, other: list[int]) -> None:
            self.other = other

        def reduce(self, tensor, reduction):
            assert reduction == "max"
            return torch.maximum(tensor, torch.tensor(self.other))

    # this rank wants 1 pass; the other wants 3 and holds 5 pairs: both run 3
    assert ForwardSplitter(100, TwoRanks([3, -5])).passes([10, 10, 10]) == 3
    # the other rank holds 2 pairs only: at most 2 passes
    assert ForwardSplitter(10, TwoRanks([1, -2])).passes([10, 10, 10, 10]) == 2
    one = SimpleNamespace(num_processes=1)
    assert ForwardSplitter(25, one).passes([10, 10, 10, 10]) == 2
    assert ForwardSplitter(5, one).passes([10, 10]) == 2  # a pair above the budget is a pass of its own


def test_real_rows_follow_the_groups():
    batch = PackedPairCollator()(random_records(4, 50, seed=1))
    pieces = ForwardSplitter(1, SimpleNamespace(num_processes=1))(batch, rows=3)  # the 4th pair is a repeat
    assert [rows for _, rows in pieces] == [1, 1, 1, 0]


def test_budget_defaults_and_refusals(tiny_model_dir):
    model = load(tiny_model_dir, "sdpa")
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    tokens, line = forward_budget(None, model, cpu, 4, None)
    assert tokens > 1000 and f"at most {tokens} tokens" in line  # the tiny model's activations are small
    assert forward_budget(None, model, cuda, 4, None)[0] is None
    assert forward_budget(300, model, cuda, 4, None) == (
        300,
        "forward passes: at most 300 tokens each (--max_tokens_per_forward)",
    )
    assert forward_budget(None, model, cpu, 4, "aot looks at the whole micro-batch")[0] is None
    with pytest.raises(UserError, match="--max_tokens_per_forward: aot looks"):
        forward_budget(300, model, cpu, 4, "aot looks at the whole micro-batch")


@pytest.mark.slow
def test_cli_passes_train_the_same_model(tiny_model_dir, synthetic_data, tmp_path):
    """--max_tokens_per_forward 60 (several passes per 8-pair micro-batch) against one pass: the same loss at every
    step and the same final weights, to float-summation order."""
    from safetensors.torch import load_file

    train, _ = synthetic_data
    runs = {}
    for name, extra in (("one", []), ("split", ["--max_tokens_per_forward", "60"])):
        out = tmp_path / name
        result = run_cli(small_run_args(tiny_model_dir, train, out, max_train_steps="4") + extra, tmp_path / "c")
        assert result.returncode == 0, result.stderr[-3000:]
        runs[name] = (read_metrics(out), load_file(out / "model.safetensors"), result.stdout)
    assert "forward passes: at most 60 tokens each" in runs["split"][2]
    losses = [[row["train_loss"] for row in runs[n][0]] for n in runs]
    assert len(losses[0]) == 4 and max(abs(a - b) for a, b in zip(*losses)) < 1e-5, losses
    # Adam divides by the gradients' running size, so summation-order noise on tiny gradients moves weights by up to
    # about 1e-5 against updates of 2e-3; a dropped or doubled pass would move them by the order of the update.
    initial = load_file(tiny_model_dir / "model.safetensors")
    for name, weight in runs["one"][1].items():
        update = (weight - initial[name]).norm().item()
        assert (runs["split"][1][name] - weight).norm().item() <= 1e-2 * update + 1e-7, name


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--loss_type", "aot"], "--max_tokens_per_forward: --loss_type aot looks at the whole micro-batch"),
        (["--load_balancing_loss"], "--max_tokens_per_forward: --load_balancing_loss looks at the whole micro-batch"),
    ],
)
def test_a_budget_for_a_whole_batch_loss_is_refused_before_any_work(flags, message):
    from open_instruct.config import validate
    from open_instruct.config.cli import parse_args

    args = parse_args(["--model_name_or_path", "m", "--max_tokens_per_forward", "100", *flags])
    with pytest.raises(UserError, match=message):
        validate(args)
