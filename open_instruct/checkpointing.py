"""Saving models so that a crash or kill never leaves a half-written one behind."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any


def save_final_model(accelerator: Any, model: Any, tokenizer: Any, output_dir: str | Path,
                     merge_lora: bool = False) -> Path:
    """Write the model (safetensors) and tokenizer in Hugging Face format directly into ``output_dir``.

    Every rank takes part (ZeRO-3 gathers the full weights); the main process writes into a temporary folder and then
    renames each file into place, so a reader never sees a partial file. A LoRA model writes its adapter instead (and,
    with ``merge_lora``, merged full weights into ``output_dir/merged``).
    """
    from open_instruct.lora import find_peft_model, save_lora_model

    if find_peft_model(model) is not None:
        return save_lora_model(accelerator, model, tokenizer, output_dir, merge=merge_lora)
    output_dir = Path(output_dir)
    state_dict = accelerator.get_state_dict(model)
    if accelerator.is_main_process:
        tmp = output_dir / ".final_model.tmp"
        if tmp.exists():
            shutil.rmtree(tmp)
        unwrapped = accelerator.unwrap_model(model)
        unwrapped.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        for item in sorted(tmp.iterdir()):
            os.replace(item, output_dir / item.name)
        tmp.rmdir()
    accelerator.wait_for_everyone()
    return output_dir
