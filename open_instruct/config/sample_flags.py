"""The sample-answer flags (:mod:`open_instruct.training.samples`), as a dataclass mixin of ``TrainArguments``."""

from __future__ import annotations

from dataclasses import dataclass

from open_instruct.config.fields import NONNEG, POS
from open_instruct.config.fields import flag as _f


@dataclass
class SampleFlags:
    """Which prompts the run answers greedily at the start, at each evaluation and at the end (samples.jsonl)."""

    sample_prompts: str | None = _f(
        None,
        "A .jsonl (a 'prompt' string or a 'messages' chat list per line) or .txt (one prompt per line) of prompts to "
        "answer (default: the first evaluation prompts, else the first training prompts).",
    )
    num_sample_prompts: int = _f(
        3,
        "Answer this many prompts greedily with the chat template at the start, at each evaluation and at the end, "
        "into <output_dir>/samples.jsonl and the trackers (0: no samples).",
        valid=NONNEG,
    )
    sample_max_new_tokens: int = _f(64, "Longest sample answer, in new tokens.", valid=POS)
