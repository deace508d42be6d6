"""The ZeRO conversion for another world size runs once, crash-safe, and a restarted run reuses it (the converter is
DeepSpeed's; here a stand-in writes its output, so only our folder handling is under test: the real conversion runs
in tests/runs/test_resume_world_size.py)."""

from __future__ import annotations

import sys
import types
from pathlib import Path
from types import SimpleNamespace

import pytest

from open_instruct.engine import zero_universal


class _Accelerator:
    def __init__(self, processes: int) -> None:
        self.num_processes, self.is_main_process, self.loaded, self.events = processes, True, [], []
        self.deepspeed_engine_wrapped = SimpleNamespace(
            engine=SimpleNamespace(_config=SimpleNamespace(load_universal_checkpoint=False))
        )

    def wait_for_everyone(self) -> None:
        self.events.append("barrier")

    def load_state(self, path: str) -> None:
        self.loaded.append((path, self.deepspeed_engine_wrapped.engine._config.load_universal_checkpoint))


def _checkpoint(path: Path, ranks: int) -> Path:
    (path / "pytorch_model").mkdir(parents=True)
    for rank in range(ranks):
        (path / "pytorch_model" / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt").write_bytes(b"")
    (path / "scheduler.bin").write_bytes(b"schedule")
    return path


@pytest.fixture
def converter(monkeypatch):
    calls = []

    def main(args):
        calls.append(args)
        Path(args.output_folder).mkdir(parents=True)
        (Path(args.output_folder) / "zero").write_text("converted")

    module = types.ModuleType("deepspeed.checkpoint.ds_to_universal")
    module.main = main
    package = types.ModuleType("deepspeed.checkpoint")
    package.ds_to_universal = module
    monkeypatch.setitem(sys.modules, "deepspeed.checkpoint", package)
    monkeypatch.setitem(sys.modules, "deepspeed.checkpoint.ds_to_universal", module)
    return calls


def test_same_world_size_loads_as_written(tmp_path, converter):
    accelerator = _Accelerator(2)
    assert zero_universal.load_resharded(accelerator, str(_checkpoint(tmp_path / "step_2", 2))) is None
    assert accelerator.loaded == [(str(tmp_path / "step_2"), False)] and converter == []


def test_conversion_redoes_a_cut_one_and_a_restart_reuses_a_finished_one(tmp_path, converter):
    path = _checkpoint(tmp_path / "step_2", 2)
    (path / "universal.tmp" / "pytorch_model").mkdir(parents=True)  # a kill cut an earlier conversion short
    (path / "universal.tmp" / "half").write_text("")
    accelerator = _Accelerator(4)
    note = zero_universal.load_resharded(accelerator, str(path))
    assert len(converter) == 1 and converter[0].input_folder == str(path / "pytorch_model")
    assert "ZeRO partitions of 2 ranks: converted it" in note
    assert not (path / "universal.tmp").exists()
    assert sorted(p.name for p in (path / "universal").iterdir()) == ["pytorch_model", "scheduler.bin"]
    # Loaded from the converted folder with DeepSpeed's universal loading on, and off again afterwards.
    assert accelerator.loaded == [(str(path / "universal"), True)]
    assert accelerator.deepspeed_engine_wrapped.engine._config.load_universal_checkpoint is False

    again = _Accelerator(1)
    assert "reused" in zero_universal.load_resharded(again, str(path))
    assert len(converter) == 1 and again.loaded == [(str(path / "universal"), True)]


def test_every_rank_has_read_the_folder_before_the_main_process_converts_into_it(tmp_path, converter, monkeypatch):
    """The other ranks walk the checkpoint folder (manifest, distributed metadata) before loading; the conversion
    writes universal.tmp into that folder, so it may start only after a barrier every rank reaches first."""
    path = _checkpoint(tmp_path / "step_2", 2)
    accelerator = _Accelerator(1)
    convert = zero_universal._convert
    monkeypatch.setattr(
        zero_universal, "_convert", lambda folder: (accelerator.events.append("convert"), convert(folder))
    )
    zero_universal.load_resharded(accelerator, str(path))
    assert accelerator.events == ["barrier", "convert", "barrier"]

    other = _Accelerator(1)  # a rank that is not the main process converts nothing but meets both barriers
    other.is_main_process = False
    zero_universal.load_resharded(other, str(path))
    assert other.events == ["barrier", "barrier"] and other.loaded == [(str(path / "universal"), True)]
