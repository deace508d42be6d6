"""The test suite, benchmarks and demo stand alone: nothing reads a ``shared`` folder beside the checkout."""

from __future__ import annotations

import re
from pathlib import Path

from tests.data_helpers import HH_SAMPLE, read_hh_rows

ROOT = Path(__file__).resolve().parents[2]
# Any path that climbs out of the repository into a sibling ``shared`` folder.
_OUTSIDE = re.compile(r"""["'/]shared["'/]|\.\./shared|parent\s*/\s*["']shared""")


def test_no_test_script_or_example_reads_a_shared_folder_outside_the_repo():
    offenders = []
    for folder in ("tests", "scripts", "examples", "open_instruct"):
        for path in (ROOT / folder).rglob("*"):
            if path.suffix in {".py", ".sh", ".yaml", ".cfg", ".toml"} and path.name != Path(__file__).name:
                text = path.read_text(encoding="utf-8", errors="replace")
                offenders += [
                    f"{path.relative_to(ROOT)}:{i}"
                    for i, line in enumerate(text.splitlines(), 1)
                    if _OUTSIDE.search(line)
                ]
    makefile = (ROOT / "Makefile").read_text()
    assert "shared" not in makefile and not offenders, offenders


def test_the_shipped_hh_fixture_is_inside_the_repo_and_carries_its_licence():
    assert HH_SAMPLE.resolve().is_relative_to(ROOT) and HH_SAMPLE.is_file()
    notice = (HH_SAMPLE.parent / "NOTICE").read_text()
    assert "MIT License" in notice and "Anthropic" in notice and "hh-rlhf" in notice
    rows = read_hh_rows()
    assert len(rows) == 411 and all(set(r) == {"chosen", "rejected"} for r in rows)
