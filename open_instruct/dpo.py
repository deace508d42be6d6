"""open-instruct's newer DPO entry (``open_instruct/dpo.py``, OLMo-core there): here the same recipe and engine as
:mod:`open_instruct.dpo_tune_cache`, so its launch commands run unchanged.

torchrun --nproc_per_node=8 open_instruct/dpo.py --model_name_or_path M --mixer_list D 1.0 --fsdp_shard_degree 8 ...
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: import the package, not this folder's modules by bare name
    sys.path[0] = str(Path(__file__).resolve().parents[1])
if __name__ == "__main__":  # before torch is imported: glibc reads its tunables when a process starts
    from open_instruct.training.host_memory import reexec_with_lean_malloc

    reexec_with_lean_malloc()

from open_instruct.dpo_tune_cache import main, run

__all__ = ["main", "run"]

if __name__ == "__main__":
    main()
