"""One loss normalization for every batching mode and world size (issue 15).

An optimizer step's gradient is that of the mean loss over its real pairs, however they are split into micro-batches
(fixed size, token budget, padded or packed) and ranks; the repeats accelerate adds to even out the ranks at an
epoch's end weigh nothing. Checked here against one big batch of the same pairs (in process, exact up to float sums)
and, on 2 processes, against one process for a run whose last optimizer step is partial (30 pairs, steps of 8).
"""

from __future__ import annotations

import copy

import pytest
import torch

from open_instruct.data.sampler import pair_dataloader, real_rows_fn
from tests.conftest import comparison_flags, launch, python_command, read_metrics, torchrun_command
from tests.data_helpers import random_pair_records
from tests.model_helpers import tiny_llama

PAIRS = 24
# Per-step losses agree to float-sum order; Adam divides tiny gradient differences by tiny second moments, so after 4
# steps at lr 1e-2 a weight may move by ~2e-5 differently (a real normalization bug moves the losses by 0.2).
LOSS_ATOL, WEIGHT_ATOL = 1e-5, 1e-4


def _records(n: int, seed: int = 0) -> list[dict]:
    """Pairs of random tokens with a shared prompt (label -100) and answers of very different lengths."""
    return random_pair_records(n, seed, 64, (2, 6), (2, 30))


def _model() -> torch.nn.Module:
    sizes = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_key_value_heads": 2}
    return tiny_llama(vocab_size=64, num_attention_heads=2, max_position_embeddings=128, pad_token_id=None, **sizes)


def _step_pieces(packing: bool) -> tuple:
    from open_instruct.objectives.combination import combined_loss
    from open_instruct.objectives.losses import LossSettings
    from open_instruct.training.preference import PreferenceSettings, make_logprob_fn

    settings = PreferenceSettings(length_normalized=False, loss_settings=LossSettings(beta=0.5))
    return make_logprob_fn(packing, "chunked", None), combined_loss(["dpo"]), settings


@pytest.mark.parametrize("packing", [False, True])
def test_token_budget_step_is_the_gradient_of_one_big_batch(packing, tmp_path):
    """One optimizer step over token-budget micro-batches of unequal sizes (SGD, lr 1, no clipping) moves the weights
    by minus the gradient of the mean loss of one padded batch holding all the pairs; the logged loss is that mean."""
    from accelerate import Accelerator

    from open_instruct.api import fresh_accelerate_state
    from open_instruct.model.packing import prepare_model_for_packing
    from open_instruct.report.tracking import MetricsLogger
    from open_instruct.training.loop import LoopSettings, train_loop
    from open_instruct.training.preference import preference_step, preference_step_fn

    records = _records(PAIRS)
    loader = pair_dataloader(records, 0, 8, seed=3, packing=packing, max_tokens=160 if packing else 200)
    sizes = [len(b) for b in loader.batch_sampler]
    assert sum(sizes) == PAIRS and len(set(sizes)) > 1, sizes  # micro-batches of different sizes: means would differ

    # The independent computation: one padded batch of every pair, mean loss, plain autograd.
    logprob_fn, loss_fn, settings = _step_pieces(packing=False)
    reference_model = _model()
    start = copy.deepcopy(reference_model.state_dict())
    big = pair_dataloader(records, 0, PAIRS, seed=0, shuffle=False)
    loss, metrics = preference_step(reference_model, next(iter(big)), logprob_fn, loss_fn, None, settings)
    loss.backward()
    expected = {n: start[n] - p.grad for n, p in reference_model.named_parameters()}

    with fresh_accelerate_state():
        accelerator = Accelerator(cpu=True, gradient_accumulation_steps=len(sizes))
        model = _model()
        if packing:
            prepare_model_for_packing(model)
        optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
        real_rows = real_rows_fn(loader, 1, 0)
        model, optimizer, prepared, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
        loop = LoopSettings(1, 1, len(sizes), 0.0, 1, real_rows=real_rows)
        fn, objective, step_settings = _step_pieces(packing)
        step_fn = preference_step_fn(fn, objective, None, step_settings)
        last = train_loop(
            accelerator,
            model,
            optimizer,
            scheduler,
            prepared,
            step_fn,
            loop,
            MetricsLogger(accelerator, tmp_path, False),
        )
    assert last["training_step"] == 1
    assert last["train_loss"] == pytest.approx(float(metrics["train_loss"]) / PAIRS, rel=1e-5)
    moved = 0
    for name, param in accelerator.unwrap_model(model).named_parameters():
        torch.testing.assert_close(param.detach(), expected[name], rtol=1e-5, atol=1e-6, msg=name)
        moved += int(not torch.equal(param.detach(), start[name]))
    assert moved > 0


@pytest.mark.parametrize(
    ("world", "batch", "mode"),
    [(2, 2, "plain"), (2, 4, "plain"), (3, 4, "plain"), (2, 4, "grouped"), (2, 8, "budget"), (3, 8, "budget")],
)
def test_real_rows_are_each_pair_once_in_accelerates_shards(world, batch, mode):
    """30 pairs sharded as accelerate does (each rank as many batches; the last short batch filled up, missing ones
    copied from the epoch's start): the real rows of all ranks' batches are every pair exactly once."""
    from accelerate.data_loader import BatchSamplerShard

    budget = 200 if mode == "budget" else None
    grouped = mode == "grouped"  # the plain order unshuffled: torch's sampler would reshuffle for each rank here
    loader = pair_dataloader(_records(30), 0, batch, 1, False, budget, grouped, shuffle=mode != "plain")
    assert (getattr(loader.batch_sampler, "batch_size", None) is not None) == (mode == "plain")
    seen = []
    for rank in range(world):
        real_rows = real_rows_fn(loader, world, rank)
        shard = list(BatchSamplerShard(loader.batch_sampler, world, rank))
        for position, indices in enumerate(shard):
            seen.extend(indices[: real_rows(0, position)])
    assert sorted(seen) == list(range(30))


@pytest.mark.slow
def test_partial_last_step_matches_one_process(tiny_model_dir, synthetic_data, tmp_path):
    """30 pairs, 4 optimizer steps of 8 (the last one 6): one process (4 per device x 2 accumulation) against 2
    processes (2 x 2) under DDP, ZeRO-2 and ZeRO-3: same per-step losses, token counts and final weights."""
    from safetensors.torch import load_file

    train, _ = synthetic_data

    # Padded rows: at lr 1e-2 Adam amplifies ZeRO-3's different reduction order on near-zero gradients of packed rows
    # past 1e-4 in a few weights; the packed engines are compared in scripts/matrix.
    flags = comparison_flags(tiny_model_dir, train, 30, gradient_accumulation_steps="2", packing="false")

    one = tmp_path / "one"
    launch(python_command(flags(one, 4)), tmp_path / "cache")
    expected = read_metrics(one)
    assert [row["training_step"] for row in expected] == [1, 2, 3, 4]
    weights = load_file(one / "model.safetensors")
    for engine, extra in (("ddp", {}), ("zero2", {"zero_stage": "2"}), ("zero3", {"zero_stage": "3"})):
        out = tmp_path / engine
        launch(torchrun_command(flags(out, 2, **extra)), tmp_path / "cache")
        rows = read_metrics(out)
        assert [r["training_step"] for r in rows] == [1, 2, 3, 4], engine
        for got, want in zip(rows, expected):
            assert got["train_loss"] == pytest.approx(want["train_loss"], abs=LOSS_ATOL), (engine, got, want)
            assert got["token_count"] == want["token_count"], (engine, got, want)
        trained = load_file(out / "model.safetensors")
        for name, value in weights.items():
            torch.testing.assert_close(trained[name], value, rtol=0, atol=WEIGHT_ATOL, msg=f"{engine} {name}")
