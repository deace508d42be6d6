"""Loading checkpoint files that may come from elsewhere without letting them run code.

A ``.pt``/``.bin``/``.pkl`` file is a pickle: an unrestricted load runs whatever functions it names. Everything we
load ourselves goes through ``torch.load(..., weights_only=True)`` (tensors, plain containers, numbers, strings), plus
the numpy array types accelerate's RNG files and older checkpoints of ours hold. While a training checkpoint is
restored by accelerate or DeepSpeed (which asks for ``weights_only=False`` for its optimizer states),
:func:`weights_only_loads` makes every ``torch.load`` a weights-only load with the same allowlist and DeepSpeed's
plain-data classes: a file naming anything else is refused, naming the file and what it asked for. The
``.metadata`` files of distributed checkpoints, which ``torch.distributed.checkpoint`` unpickles itself, are read
first with an unpickler that allows only their plain metadata classes (:func:`check_distributed_metadata`).
"""

from __future__ import annotations

import pickle
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from open_instruct.errors import UserError


def _numpy_globals() -> list[Any]:
    """What a pickled numpy array needs: its reconstructor, the array and dtype types (data, never code)."""
    core = getattr(np, "_core", None) or np.core  # numpy 2 renamed np.core
    found: list[Any] = [core.multiarray._reconstruct, np.ndarray, np.dtype]
    found += [getattr(np.dtypes, name) for name in dir(np.dtypes) if name.endswith("DType")]
    return found


def _deepspeed_globals() -> list[Any]:
    """The classes DeepSpeed pickles into its checkpoints besides tensors: enums and plain config values. Only when
    DeepSpeed drives the run (is imported): otherwise no checkpoint of ours names them."""
    if "deepspeed" not in sys.modules:
        return []
    try:
        # deepspeed is optional (ZeRO runs and their checkpoints only)
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum  # as above
        from deepspeed.utils.tensor_fragment import fragment_address  # as above
    except ImportError:  # DeepSpeed not installed: its checkpoints cannot be resumed anyway
        return []
    # DynamicLossScaler: the ZeRO optimizer's state under fp16 (its dynamic loss scale), LossScaler otherwise.
    return [ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address]


def allowed_globals() -> list[Any]:
    """Every non-builtin a weights-only load of our checkpoints may construct."""
    return _numpy_globals() + _deepspeed_globals()


def _refused(source: Any, err: Exception) -> UserError:
    # torch's message says what was refused in its "WeightsUnpickler error:" line; the rest is advice to load anyway.
    found = re.search(r"WeightsUnpickler error: (.*?)(?:\. Please|\n|$)", str(err))
    detail = found.group(1) if found else str(err).splitlines()[0]
    return UserError(
        f"{source}: refused to load: it is a pickle that asks for more than tensors and plain data "
        f"({detail}); a checkpoint must not run code, so this file was not loaded"
    )


def load_plain(path: str | Path, map_location: Any = "cpu") -> Any:
    """``torch.load`` of a file of ours as a weights-only load (numpy arrays allowed); anything else is refused."""
    with torch.serialization.safe_globals(allowed_globals()):
        try:
            return torch.load(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as err:
            raise _refused(path, err) from None


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles a distributed checkpoint's ``.metadata`` allowing only the plain classes it is made of: the
    dataclasses and enums of ``torch.distributed.checkpoint.metadata``, its storage info, sizes, dtypes, layouts and
    paths."""

    _PATHS = ("PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath")

    def find_class(self, module: str, name: str) -> Any:
        found = super().find_class(module, name) if module.startswith(("torch", "pathlib", "collections")) else None
        allowed = (
            (module == "torch.distributed.checkpoint.metadata" and isinstance(found, type))
            or (module, name) in {("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size")}
            or (module, name) == ("torch.serialization", "_get_layout")
            or (module == "torch" and isinstance(found, torch.dtype))
            or (module == "pathlib" and name in self._PATHS)
            or (module, name) == ("collections", "OrderedDict")
        )
        if not allowed:
            raise pickle.UnpicklingError(f"WeightsUnpickler error: Unsupported global: GLOBAL {module}.{name}")
        return found


def check_distributed_metadata(folder: Path) -> None:
    """Refuse a checkpoint whose distributed-checkpoint ``.metadata`` files (FSDP2's training checkpoints) name
    anything but plain metadata classes: ``torch.distributed.checkpoint`` unpickles them without restriction."""
    for path in sorted(folder.rglob(".metadata")):
        with path.open("rb") as handle:
            try:
                _MetadataUnpickler(handle).load()
            except (pickle.UnpicklingError, AttributeError, ImportError, EOFError) as err:
                raise _refused(path, err) from None


@contextmanager
def weights_only_loads() -> Iterator[None]:
    """Within the block every ``torch.load`` (accelerate's, DeepSpeed's) is weights-only with our allowlist, whatever
    its caller asked for; a file that needs more is refused with a :class:`UserError` naming it, also when the caller
    catches the error (accelerate skips RNG files it cannot read): the refusal is raised again at the block's end."""
    original = torch.load
    refused: list[UserError] = []

    def guarded(f: Any, *args: Any, **kwargs: Any) -> Any:
        kwargs["weights_only"] = True
        kwargs.pop("pickle_module", None)  # a custom unpickler would bypass the restriction
        with torch.serialization.safe_globals(allowed_globals()):
            try:
                return original(f, *args, **kwargs)
            except pickle.UnpicklingError as err:
                refused.append(_refused(f, err))
                raise refused[-1] from None

    torch.load = guarded
    try:
        yield
    finally:
        torch.load = original
    if refused:
        raise refused[0]
