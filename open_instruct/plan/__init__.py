"""``--dry_run``: check a run's inputs and predict its memory and time per GPU without loading weights.

- ``gpus.py``: the GPU table (memory, peak FLOP/s);
- ``model_config.py``: a model's shape from its ``config.json`` only (local folder, shipped copy, or the hub);
- ``memory.py``: the memory model of the reference pass and the training step, per GPU, with its formulas;
- ``timing.py``: FLOPs and time at a stated MFU;
- ``report.py``: the printed plan and the cheapest changes that make a run fit;
- ``check.py``: the checks (data, output folder, Hub, tracking) and :func:`check.dry_run`, the entry.
"""
