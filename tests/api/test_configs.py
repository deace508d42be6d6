"""``batch_size`` is the global batch: the gradient accumulation that keeps it on any number of processes."""

from __future__ import annotations

import itertools

import pytest

from open_instruct import UserError
from open_instruct.api.configs import accumulation_steps


def _keeping(batch: int, micro: int, processes: int) -> int | None:
    """The accumulation with micro x it x processes == batch, by search (None: there is none)."""
    found = [s for s in range(1, batch + 1) if micro * s * processes == batch]
    return found[0] if found else None


@pytest.mark.parametrize(
    "batch, micro, processes", list(itertools.product([1, 6, 16, 30, 64], [1, 2, 4, 8], [1, 2, 3, 4, 8]))
)
def test_accumulation_keeps_the_global_batch_or_refuses(batch, micro, processes):
    expected = _keeping(batch, micro, processes)
    for given in (None, 1, 16):
        if expected is None:
            with pytest.raises(UserError, match=rf"batch_size {batch} \(global\) cannot be split evenly") as err:
                accumulation_steps(batch, micro, given, processes)
            assert "\n" not in str(err.value)
            continue
        steps, note = accumulation_steps(batch, micro, given, processes)
        assert steps == expected and micro * steps * processes == batch
        if given is None or given == expected:
            assert note is None
        else:
            assert note == (
                f"note: gradient_accumulation_steps {given} -> {expected}: keeps the global batch_size {batch} = "
                f"micro_batch_size {micro} x {expected} x {processes} process(es)"
            )


def test_the_documented_example_on_one_and_on_several_processes():
    """batch_size=16, micro_batch_size=1, gradient_accumulation_steps=16: as given on one process, 8 on two."""
    assert accumulation_steps(16, 1, 16, 1) == (16, None)
    steps, note = accumulation_steps(16, 1, 16, 2)
    assert steps == 8 and note.startswith("note: gradient_accumulation_steps 16 -> 8")
    assert accumulation_steps(16, 1, 16, 16)[0] == 1
    with pytest.raises(UserError, match="make it a multiple of 32"):
        accumulation_steps(16, 1, 16, 32)


@pytest.mark.parametrize("args", [(0, 1, None, 1), (8, 0, None, 1), (8, 1, 0, 1), (8, 1, 2.0, 1), (8.0, 1, 8, 1)])
def test_sizes_must_be_positive_integers(args):
    with pytest.raises(UserError, match="must be an integer >= 1"):
        accumulation_steps(*args)
