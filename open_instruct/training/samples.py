"""Sample answers: a few prompts answered greedily (the model's chat template) by the starting model, at each
evaluation and at the end, so a run shows how its answers changed (``--num_sample_prompts``, ``--sample_prompts``,
``--sample_max_new_tokens``).

Every rank runs the same ``generate`` on the same prompts (ZeRO-3 and FSDP2 gather the weights inside each forward,
so a rank that skipped it would hang the others; ``synced_gpus`` keeps the ranks stepping together); only the main
process writes (:mod:`open_instruct.report.samples`). Sampling leaves training as it was: no gradients, eval mode
and back, and the random generators' states restored, so a run's losses are the same with sampling on or off.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from open_instruct.data.tokenize import IGNORE_INDEX, needs_bos, render
from open_instruct.report import samples as report


@dataclass(frozen=True)
class SamplePrompt:
    """A prompt as shown (``text``) and as the model reads it (``ids``: chat template, generation prompt)."""

    text: str
    ids: list[int]


def prompts_from_records(records: Sequence[dict[str, Any]], tokenizer: Any, n: int) -> list[SamplePrompt]:
    """The first ``n`` pairs' prompts: the chosen side's ids before its first label (the templated prompt with the
    generation prompt, exactly as training reads it)."""
    prompts = []
    for record in records[:n]:
        labels = list(record["chosen_labels"])
        length = next((i for i, label in enumerate(labels) if label != IGNORE_INDEX), len(labels))
        ids = [int(t) for t in record["chosen_input_ids"][:length]]
        prompts.append(SamplePrompt(tokenizer.decode(ids, skip_special_tokens=True).strip(), ids))
    return prompts


def prompts_from_file(path: str, tokenizer: Any, n: int, add_bos: bool) -> list[SamplePrompt]:
    """The first ``n`` chats of a ``--sample_prompts`` file, rendered with the chat template's generation prompt."""
    prompts = []
    for messages in report.read_prompt_file(path)[:n]:
        ids = tokenizer(render(tokenizer, messages, add_generation_prompt=True), add_special_tokens=False)["input_ids"]
        if needs_bos(ids, tokenizer.bos_token_id, add_bos):
            ids = [tokenizer.bos_token_id, *ids]
        prompts.append(SamplePrompt(messages[-1]["content"], list(ids)))
    return prompts


@torch.no_grad()
def greedy_answers(
    accelerator: Any, model: Any, tokenizer: Any, prompts: list[SamplePrompt], max_new_tokens: int
) -> list[tuple[str, int, float]]:
    """(answer, new tokens, seconds) per prompt, greedy, one prompt at a time (no padding to change an answer);
    called on every rank. The model comes back in the mode it had, the random generators as they were."""
    unwrapped = accelerator.unwrap_model(model)
    was_training = unwrapped.training
    unwrapped.eval()  # no dropout
    devices = [accelerator.device] if accelerator.device.type == "cuda" else []
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    answers = []
    try:
        with torch.random.fork_rng(devices=devices):
            for prompt in prompts:
                ids = torch.tensor([prompt.ids], device=accelerator.device)
                began = time.perf_counter()
                out = unwrapped.generate(
                    input_ids=ids,
                    attention_mask=torch.ones_like(ids),
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    pad_token_id=pad,
                    synced_gpus=accelerator.num_processes > 1,
                )
                new = out[0, ids.shape[1] :].tolist()
                if tokenizer.eos_token_id in new:  # what synced ranks add after it is padding
                    new = new[: new.index(tokenizer.eos_token_id) + 1]
                seconds = time.perf_counter() - began
                answers.append((tokenizer.decode(new, skip_special_tokens=True).strip(), len(new), seconds))
    finally:
        unwrapped.train(was_training)
    return answers


@dataclass(eq=False)
class AnswerSampler:
    """The run's sample prompts answered at each occasion: ``begin`` (the starting model; a resumed run keeps its
    earlier rows), ``around(evaluate)`` (after each evaluation), ``finish`` (the end). No prompts: does nothing."""

    accelerator: Any
    model: Any
    tokenizer: Any
    prompts: list[SamplePrompt]
    max_new_tokens: int
    output_dir: Path
    _unsent: list[tuple[int, list[dict[str, Any]]]] = field(default_factory=list)

    def sample(self, occasion: str | int, tracker_step: int) -> list[dict[str, Any]]:
        """Answer every prompt now (every rank); the main process writes the rows and sends them to the trackers."""
        if not self.prompts:
            return []
        answers = greedy_answers(self.accelerator, self.model, self.tokenizer, self.prompts, self.max_new_tokens)
        rows = [
            {"step": occasion, "prompt_index": i, "prompt": p.text, "answer": a, "tokens": n, "seconds": round(s, 4)}
            for i, (p, (a, n, s)) in enumerate(zip(self.prompts, answers))
        ]
        if self.accelerator.is_main_process:
            report.append_rows(self.output_dir, rows)
            self._unsent.append((tracker_step, rows))
            if getattr(self.accelerator, "trackers", None):  # started by the recipe's train: "start" waits for it
                report.log_to_trackers(self.accelerator, report.read_rows(self.output_dir), self._unsent, tracker_step)
                self._unsent = []
        return rows

    def begin(self, resumed: Any = None) -> None:
        """A fresh run (``resumed`` None): a new ``samples.jsonl`` with the starting model's answers. A resumed one
        (``resumed``: the checkpoint's TrainerState; the weights are already its): the rows of the first attempt up
        to its step are kept (at the step too unless its evaluation is redone), "start" among them."""
        if not self.prompts:
            return
        if resumed is None:
            if self.accelerator.is_main_process:
                report.keep_rows(self.output_dir, lambda row: False)
            self.sample("start", 0)
        elif self.accelerator.is_main_process:
            report.keep_rows(self.output_dir, lambda row: _before(row["step"], resumed.step, resumed.eval_pending))

    def around(self, evaluate: Callable[[int], Any] | None) -> Callable[[int], Any] | None:
        """``evaluate`` followed by sampling at the same step (None stays None: no evaluation set, no occasion)."""
        if evaluate is None or not self.prompts:
            return evaluate

        def evaluate_and_sample(step: int) -> Any:
            metrics = evaluate(step)
            self.sample(step, step)
            return metrics

        return evaluate_and_sample

    def finish(self, last_step: int) -> None:
        """The final answers (the run summary shows them beside the first: ``report.samples.side_by_side``)."""
        if self.prompts:
            self.sample("final", last_step)


def _before(step: str | int, resumed_step: int, eval_pending: bool) -> bool:
    """Whether a row of the first attempt stands for a resume at ``resumed_step`` (later ones are redone)."""
    if step == "start":
        return True
    return isinstance(step, int) and (step < resumed_step or (step == resumed_step and not eval_pending))


def answer_sampler(
    accelerator: Any,
    model: Any,
    tokenizer: Any,
    output_dir: Path,
    how: tuple[str | None, int, int, bool],
    records: tuple[Sequence[dict[str, Any]], Sequence[dict[str, Any]]],
) -> AnswerSampler:
    """The run's sampler. ``how``: (``--sample_prompts``, ``--num_sample_prompts``, ``--sample_max_new_tokens``,
    ``--add_bos``); ``records``: (evaluation pairs, training pairs), the first of them the prompts without a file."""
    path, n, max_new_tokens, add_bos = how
    evaluation, training = records
    if n <= 0:
        prompts = []
    elif path:
        prompts = prompts_from_file(path, tokenizer, n, add_bos)
    elif evaluation:
        prompts = prompts_from_records(evaluation, tokenizer, n)
    else:
        prompts = prompts_from_records(training, tokenizer, n)
        accelerator.print(
            f"samples: no evaluation set, so the first {len(prompts)} training prompts (seen in training)"
        )
    return AnswerSampler(accelerator, model, tokenizer, prompts, max_new_tokens, output_dir)
