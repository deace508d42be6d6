"""open-instruct's newer DPO entry (``open_instruct/dpo.py``, OLMo-core there): here the same recipe and engine as
:mod:`open_instruct.dpo_tune_cache`, so its launch commands run unchanged.

torchrun --nproc_per_node=8 open_instruct/dpo.py --model_name_or_path M --mixer_list D 1.0 --fsdp_shard_degree 8 ...

This file holds no recipe of its own: it runs ``dpo_tune_cache`` as the main module (one implementation, and no entry
script imports another).
"""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

if __name__ == "__main__":
    if __package__ in (None, ""):  # run as a file: import the package, not this folder's modules by bare name
        sys.path[0] = str(Path(__file__).resolve().parents[1])
    runpy.run_module("open_instruct.dpo_tune_cache", run_name="__main__", alter_sys=True)
