"""A checkpoint in a format the engine cannot read (FSDP2's distributed checkpoint vs one written unsharded) is one
error line naming the folder and how to resume it, before anything is loaded."""

from __future__ import annotations

import pytest

from open_instruct.engine.base import DCP_MODEL, Engine
from open_instruct.engine.fsdp2 import Fsdp2Engine
from open_instruct.errors import UserError


class _Accelerator:
    def __init__(self) -> None:
        self.loaded: list[str] = []

    def load_state(self, path: str) -> None:
        self.loaded.append(path)


def test_a_distributed_checkpoint_is_refused_without_fsdp2_and_loaded_with_it(tmp_path):
    (tmp_path / DCP_MODEL).mkdir()
    accelerator = _Accelerator()
    with pytest.raises(UserError, match=f"cannot resume {tmp_path} without FSDP2: .* with --fsdp under torchrun"):
        Engine.load_state(accelerator, str(tmp_path))
    assert accelerator.loaded == []
    assert Fsdp2Engine.load_state(accelerator, str(tmp_path)) is None
    assert accelerator.loaded == [str(tmp_path)]


def test_an_unsharded_checkpoint_is_refused_under_fsdp2_and_loaded_without_it(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    accelerator = _Accelerator()
    with pytest.raises(UserError, match=f"cannot resume {tmp_path} under FSDP2: it was written unsharded"):
        Fsdp2Engine.load_state(accelerator, str(tmp_path))
    assert accelerator.loaded == []
    assert Engine.load_state(accelerator, str(tmp_path)) is None
    assert accelerator.loaded == [str(tmp_path)]
