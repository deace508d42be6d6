"""Pretraining a causal LM from scratch on raw text: the stage before SFT, with the same machinery, top to bottom.

    python -m open_instruct.pretrain [recipe.yaml] --model_name_or_path CONFIG --tokenizer_name_or_path TOK \\
        --mixer_list corpus.txt 1.0 --max_seq_length 512 [--text_column text] ...
    accelerate launch -m open_instruct.pretrain ...

``--model_name_or_path`` names the architecture only: a folder or hub id whose ``config.json`` is built with fresh
weights (the Python API takes a Llama-shaped ``ModelConfig`` too). The text (:mod:`open_instruct.data.text`) is
tokenized, joined with EOS and packed into blocks of ``--max_seq_length`` tokens; the loss is the mean negative
log-likelihood per token; the held-out perplexity is evaluated before training, every ``--eval_steps`` and at the end.
Checkpoints, exact resume, logging and the final Hugging Face folder are those of SFT and DPO; that folder (or its
``pretrain_final.pt``) is ``run_sft``'s ``pretrain_checkpoint``.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from functools import partial
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: import the package, not this folder's modules by bare name
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import json

import torch
from torch.utils.data import DataLoader

from open_instruct.config import TrainArguments, settings_of, validate
from open_instruct.config.cli import exit_on_user_error, parse_args
from open_instruct.config.stage_flags import NOT_FOR_PRETRAINING
from open_instruct.data.sft import SFTCollator
from open_instruct.data.text import prepare_text_data
from open_instruct.errors import UserError
from open_instruct.files import write_text_atomic
from open_instruct.model.modeling import note_slow_tokenizer, resolve_attn_implementation
from open_instruct.objectives.logprobs import sequence_logprobs
from open_instruct.report.phases import phase
from open_instruct.report.tracking import MetricsLogger
from open_instruct.training import recipe
from open_instruct.training.evaluation import NLLEvaluator
from open_instruct.training.precision import in_run_precision
from open_instruct.training.recipe import preflight
from open_instruct.training.resume import run_signature, start_or_resume
from open_instruct.training.sft import sft_step


def check_pretrain_arguments(args: TrainArguments) -> None:
    """Reject flags pretraining does not use, then run the common validation."""
    defaults = TrainArguments(reference_logprobs_cache_path="unused")
    used = [f"--{name}" for name in NOT_FOR_PRETRAINING if getattr(args, name) != getattr(defaults, name)]
    if used:
        raise UserError(f"{', '.join(used)}: not used by pretraining from scratch")
    if args.dry_run:  # the planner reads a model config; pretraining builds its model from flags
        raise UserError("--dry_run is not supported for pretraining yet (it plans the DPO and SFT entries)")
    if args.max_seq_length < 2:
        raise UserError(f"--max_seq_length (the block size) must be >= 2, got {args.max_seq_length}")
    validate(args)


def load_text_tokenizer(args: TrainArguments) -> Any:
    """The tokenizer (no chat template needed: the data is raw text)."""
    # transformers takes seconds to import: --help, validation and the planner never need it
    from transformers import AutoTokenizer

    name = args.tokenizer_name_or_path or args.model_name_or_path

    try:
        tokenizer = AutoTokenizer.from_pretrained(
            name, revision=args.tokenizer_revision, use_fast=not args.use_slow_tokenizer
        )
    except (OSError, ValueError) as err:
        raise UserError(
            f"could not load tokenizer {name!r} (pretraining needs --tokenizer_name_or_path): {err}"
        ) from err
    note_slow_tokenizer(args.use_slow_tokenizer, tokenizer, name)
    return tokenizer


def build_model(args: TrainArguments, tokenizer: Any, log: Any = print) -> Any:
    """Fresh weights (from the run's seed) for the architecture in ``--model_name_or_path``'s config.json."""
    # transformers takes seconds to import: --help, validation and the planner never need it
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(args.model_name_or_path, trust_remote_code=args.trust_remote_code)
    except (OSError, ValueError) as err:
        raise UserError(f"no model config at {args.model_name_or_path!r}: {err}") from err
    if config.vocab_size < len(tokenizer):
        raise UserError(f"the model config's vocab_size {config.vocab_size} < the tokenizer's {len(tokenizer)} tokens")
    context = getattr(config, "max_position_embeddings", None)
    if context is not None and args.max_seq_length > context:
        raise UserError(f"--max_seq_length {args.max_seq_length} exceeds the model's context of {context} tokens")
    attn, why = resolve_attn_implementation(args.attn_implementation)
    log(f"model: attention implementation {attn} ({why})")
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn, dtype=torch.float32)
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    log(f"model: {type(model).__name__} from scratch, {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params")
    return model


def blocks_fingerprint(records: list[dict[str, Any]]) -> str:
    """sha256 over the token blocks: identifies the run's data for exact resume."""
    digest = hashlib.sha256()
    for r in records:
        digest.update(torch.tensor(r["input_ids"], dtype=torch.int64).numpy())
    return digest.hexdigest()


def run(args: TrainArguments, text_column: str = "text") -> Path:
    """Pretrain one model from scratch on raw text; returns the folder holding the final checkpoint."""
    cfg = settings_of(args)  # each layer below gets the settings of its concern

    # 1. Engine, seed, tokenizer, text packed into blocks (every file read before the model is built).
    accelerator, output_dir = recipe.start_run(args)
    tokenizer = load_text_tokenizer(args)
    with phase("data"):
        records, eval_records, stats = prepare_text_data(cfg.data, tokenizer, text_column)
    accelerator.print(
        f"data: {stats['documents']} documents, {stats['tokens']} tokens -> {stats['blocks']} blocks of "
        f"{stats['block_size']} ({stats['dropped_tail_tokens']} tail tokens dropped)"
        + (f"; {len(eval_records)} held-out blocks" if eval_records else "")
    )
    if accelerator.is_main_process:
        write_text_atomic(output_dir / "data_statistics.json", json.dumps(stats, indent=2))

    # 2. Model with fresh weights, optimizer, schedule, data loader under the engine.
    model = build_model(args, tokenizer, log=accelerator.print)
    collate = SFTCollator(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)
    train_loader = DataLoader(records, batch_size=args.per_device_train_batch_size, shuffle=True, collate_fn=collate)
    run = recipe.prepare_training(args, accelerator, model, train_loader, output_dir, "blocks", "pretrain")

    def logprob_fn_fp(m: Any, batch: dict[str, torch.Tensor]) -> Any:
        return sequence_logprobs(
            m, batch["input_ids"], batch["attention_mask"], batch["labels"], chunk_size=args.logprob_chunk_size
        )

    logprob_fn = in_run_precision(accelerator, logprob_fn_fp, report=accelerator.print)

    # 3. Training (from the newest complete checkpoint when there is one), held-out perplexity before and during.
    logger = MetricsLogger(accelerator, output_dir, use_wandb=args.with_tracking)
    signature = run_signature(
        cfg.batch, cfg.optim, len(records), blocks_fingerprint(records), run.total_steps, accelerator.num_processes
    )
    faults = start_or_resume(cfg.checkpoint, accelerator, signature, logger)
    evaluate = None
    if eval_records:
        eval_loader = accelerator.prepare_data_loader(
            DataLoader(
                eval_records, batch_size=2 * args.per_device_train_batch_size, shuffle=False, collate_fn=collate
            )
        )
        evaluate = NLLEvaluator(
            accelerator, run.model, eval_loader, len(eval_records), logprob_fn, logger, perplexity=True
        )
        if faults.resume_state is None:
            evaluate(0)  # the untrained model: the baseline the run's perplexity is read against
    recipe.train(args, accelerator, run, sft_step(logprob_fn), logger, evaluate, faults)

    # 4. Final checkpoint in Hugging Face format (run_sft's starting point), curves.
    recipe.finish_run(accelerator, run.model, tokenizer, output_dir)
    accelerator.end_training()
    return output_dir


def main(argv: list[str] | None = None) -> None:
    """Command-line entry: one clear line and exit code 2 for bad input."""

    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--text_column", default="text")
    known, rest = pre.parse_known_args(sys.argv[1:] if argv is None else argv)

    def entry() -> None:
        args = parse_args(rest, stage="pretrain")
        check_pretrain_arguments(args)
        preflight(args, pretraining=True)
        with recipe.summarized(args, "pretrain", partial(recipe.summarize, args, "pretrain", argv)):
            run(args, known.text_column)

    exit_on_user_error(entry)


if __name__ == "__main__":
    main()
