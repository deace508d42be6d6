"""README.md and docs/*.md stay true: every command in a shell code block names a Makefile target, a script or a module
that exists, every training command line parses with the recipe's own parser (the cheap ones run), every relative link
resolves, and the README stays a short guide."""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from open_instruct.config.cli import parse_args
from open_instruct.errors import UserError
from tests.conftest import ROOT, run_cli, run_python

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELL_LANGUAGES = {"bash", "sh", "shell", "console"}
README_MAX_LINES = 250
# The entry points whose command lines are training flags: checked with the recipe's parser.
RECIPE_SCRIPTS = {"open_instruct/dpo_tune_cache.py", "open_instruct/dpo.py"}
RECIPE_MODULES = {"open_instruct.dpo_tune_cache", "open_instruct.dpo"}


@dataclass(frozen=True)
class Command:
    page: Path
    line: int  # 1-based line of the page where the command starts
    env: dict[str, str]  # the NAME=value words before the program
    words: list[str]

    def __str__(self) -> str:
        name = self.page.relative_to(ROOT) if self.page.is_relative_to(ROOT) else self.page.name
        return f"{name}:{self.line}: {shlex.join(self.words)}"


def shell_blocks(text: str) -> list[tuple[int, list[str]]]:
    """(first line number, lines) of each fenced code block in a shell language."""
    blocks, language, start, lines = [], None, 0, []
    for number, line in enumerate(text.splitlines(), 1):
        fence = re.match(r"^\s*```(\S*)", line)
        if fence and language is None:
            language, start, lines = fence.group(1).lower(), number + 1, []
        elif fence:
            if language in SHELL_LANGUAGES:
                blocks.append((start, lines))
            language = None
        elif language is not None:
            lines.append(line)
    return blocks


def commands_of(page: Path) -> list[Command]:
    """Every simple command of the page's shell blocks: continuation lines joined, comments dropped, split at
    ``&&``, ``||``, ``;`` and ``|``, leading ``NAME=value`` words taken as its environment."""
    found = []
    for start, lines in shell_blocks(page.read_text()):
        joined, first = "", None
        for offset, line in enumerate(lines):
            first = start + offset if first is None else first
            joined += line[:-1] + " " if line.rstrip().endswith("\\") else line
            if line.rstrip().endswith("\\"):
                continue
            words = shlex.split(joined, comments=True)
            for part in _split_at_operators(words):
                env = {}
                while part and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", part[0]):
                    name, _, value = part.pop(0).partition("=")
                    env[name] = value
                if part:
                    found.append(Command(page, first, env, part))
            joined, first = "", None
    return found


def _split_at_operators(words: list[str]) -> list[list[str]]:
    parts = [[]]
    for word in words:
        if word in ("&&", "||", ";", "|"):
            parts.append([])
        else:
            parts[-1].append(word)
    return [part for part in parts if part]


ALL_COMMANDS = [command for page in PAGES for command in commands_of(page)]


def makefile_targets() -> set[str]:
    return set(re.findall(r"^([A-Za-z0-9_.-]+):", (ROOT / "Makefile").read_text(), flags=re.MULTILINE))


def recipe_flags(words: list[str]) -> list[str] | None:
    """The flags a command gives the DPO recipe (``python open_instruct/dpo_tune_cache.py ...``, ``python -m
    open_instruct.dpo_tune_cache ...``, ``accelerate launch [its flags] open_instruct/dpo_tune_cache.py ...``), or
    None when it is no recipe command."""
    for i, word in enumerate(words):
        if word in RECIPE_SCRIPTS:
            return words[i + 1 :]
        if word == "-m" and i + 1 < len(words) and words[i + 1] in RECIPE_MODULES:
            return words[i + 2 :]
    return None


def parse_recipe_flags(flags: list[str]) -> object:
    """Parse ``flags`` as the recipe does, run from the repository root. A recipe named as the positional argument is
    read when it is in the repository; a placeholder name (``recipe.yaml``) is left out and the flags parsed alone."""
    if flags and not flags[0].startswith("-") and not (ROOT / flags[0]).is_file():
        flags = flags[1:]
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        return parse_args(flags)
    finally:
        os.chdir(cwd)


def check_command(command: Command) -> None:
    """Fail naming the command when what it names does not exist or its training flags do not parse."""
    program, args = command.words[0], command.words[1:]
    if program == "make":
        missing = [a for a in args if "=" not in a and not a.startswith("-") and a not in makefile_targets()]
        assert not missing, f"{command}: no Makefile target {missing}"
    elif program in ("bash", "sh", "python", "accelerate"):
        script = next((a for a in args if a.endswith((".sh", ".py", ".sbatch"))), None)
        module = args[args.index("-m") + 1] if program == "python" and "-m" in args else None
        assert script or module, f"{command}: names no script or module"
        if script and (program != "python" or "-m" not in args[: args.index(script)]):
            assert (ROOT / script).is_file(), f"{command}: {script} does not exist"
        if module:
            assert importlib.util.find_spec(module) is not None, f"{command}: no module {module}"
        flags = recipe_flags(command.words)
        if flags is not None:
            try:
                parse_recipe_flags(flags)
            except UserError as error:
                raise AssertionError(f"{command}: the recipe's parser refuses it: {error}") from error
    elif program == "source":  # only the virtual environment `make install` creates
        assert args == [".venv/bin/activate"], f"{command}: sources something other than .venv/bin/activate"
    else:
        raise AssertionError(f"{command}: a command this test does not know how to check ({program})")


def test_the_pages_have_commands_of_every_kind_checked():
    programs = {command.words[0] for command in ALL_COMMANDS}
    assert {"make", "bash", "python", "accelerate"} <= programs
    assert sum(recipe_flags(c.words) is not None for c in ALL_COMMANDS) >= 5


@pytest.mark.parametrize("command", ALL_COMMANDS, ids=str)
def test_each_command_in_the_docs_names_what_exists_and_parses(command):
    check_command(command)


def test_a_wrong_flag_target_script_or_module_in_a_page_fails(tmp_path):
    """The check itself: a copy of a page with one broken command of each kind is caught, naming the command."""
    readme = (ROOT / "README.md").read_text()
    broken = {
        "flag": "```bash\npython open_instruct/dpo_tune_cache.py --model_name_or_path m --learning_rat 1e-6\n```\n",
        "target": "```bash\nmake demoo\n```\n",
        "script": "```bash\nbash scripts/train/tulu3/dpo_9b.sh\n```\n",
        "module": "```sh\npython -m open_instruct.no_such_module --help\n```\n",
        "launcher": "```bash\naccelerate launch --num_processes 2 open_instruct/dpo_tune_cache.py --beta\n```\n",
    }
    for kind, block in broken.items():
        page = tmp_path / f"{kind}.md"
        page.write_text(readme + "\n" + block)
        bad = [c for c in commands_of(page) if c.line > len(readme.splitlines())]
        assert len(bad) == 1, kind
        with pytest.raises(AssertionError, match=re.escape(f"{kind}.md:")):
            check_command(bad[0])


def test_shell_blocks_join_continuations_and_drop_comments(tmp_path):
    page = tmp_path / "p.md"
    page.write_text(
        "x\n```bash\nA=1 B=2 bash s.sh \\\n    --x 1  # note\nmake a && make b\n```\n```python\nimport x\n```\n"
    )
    assert [(c.line, c.env, c.words) for c in commands_of(page)] == [
        (3, {"A": "1", "B": "2"}, ["bash", "s.sh", "--x", "1"]),
        (5, {}, ["make", "a"]),
        (5, {}, ["make", "b"]),
    ]


def launch_script_recipe_flags(command: Command) -> list[str]:
    """The recipe flags a ``bash scripts/train/...`` command of the docs ends up passing, from the script's
    ``DRY_RUN=1`` print (its extra flags included)."""
    env = {**os.environ, **command.env, "DRY_RUN": "1", "PLAN": "0"}
    result = subprocess.run(command.words, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, f"{command}: {result.stderr[-2000:]}"
    flags = recipe_flags(shlex.split(result.stdout.strip().splitlines()[-1]))
    assert flags is not None, f"{command}: printed no recipe command: {result.stdout[-500:]}"
    return flags


SCRIPT_COMMANDS = [c for c in ALL_COMMANDS if c.words[0] == "bash" and c.words[1].startswith("scripts/train/")]


@pytest.mark.parametrize("command", SCRIPT_COMMANDS, ids=str)
def test_each_launch_script_command_in_the_docs_prints_a_command_that_parses(command):
    flags = launch_script_recipe_flags(command)
    parse_recipe_flags(flags)
    for extra in command.words[2:]:  # the flags the docs add reach the recipe
        assert extra in flags


def test_the_recipe_help_runs(tmp_path):
    result = run_cli(["--help"], tmp_path / "cache", timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "--model_name_or_path" in result.stdout and "--mixer_list" in result.stdout


DRY_RUN_COMMANDS = [c for c in ALL_COMMANDS if "--dry_run" in (recipe_flags(c.words) or [])]


@pytest.mark.slow
@pytest.mark.parametrize("command", DRY_RUN_COMMANDS, ids=str)
def test_each_dry_run_command_in_the_docs_plans(command, tmp_path):
    """The documented plans run offline (shipped model configs, the pair count given) and say whether they fit."""
    result = run_python(["open_instruct/dpo_tune_cache.py", *recipe_flags(command.words)], tmp_path, timeout=300)
    assert result.returncode == 0, f"{command}: {result.stderr[-3000:]}"
    assert re.search(r"needs [\d.]+ GiB of [\d.]+ GiB usable", result.stdout), result.stdout[-2000:]


def test_the_own_data_example_of_the_readme_checks_a_real_file(tiny_model_dir, synthetic_data, tmp_path):
    """README's "Your own data" command, with the tiny model and a file of the documented layout, passes every check
    of a --dry_run (flags, data rows, output folder)."""
    (example,) = [c for c in ALL_COMMANDS if c.page.name == "README.md" and "my_prefs.jsonl" in c.words]
    flags = recipe_flags(example.words)
    flags[flags.index("--model_name_or_path") + 1] = str(tiny_model_dir)
    flags[flags.index("my_prefs.jsonl")] = str(synthetic_data[0])
    flags[flags.index("--output_dir") + 1] = str(tmp_path / "out")
    result = run_python(["open_instruct/dpo_tune_cache.py", *flags, "--dry_run"], tmp_path / "cache", timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "plan (dpo)" in result.stdout
    assert not (tmp_path / "out").exists()


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a Markdown heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower().replace("`", ""))
    return text.replace(" ", "-")


def anchors_of(page: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.DOTALL)
    return {github_anchor(m) for m in re.findall(r"^#{1,6} (.+)$", text, flags=re.MULTILINE)}


def relative_links(page: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.DOTALL)
    text = re.sub(r"`[^`\n]*`", "", text)
    links = re.findall(r"\]\(([^)\s]+)\)", text)
    return [link for link in links if not re.match(r"^[a-z]+:", link)]


def broken_links(page: Path) -> list[str]:
    broken = []
    for link in relative_links(page):
        path, _, anchor = link.partition("#")
        target = (page.parent / path).resolve() if path else page
        if not target.exists():
            broken.append(f"{link}: no file {target}")
        elif anchor and target.suffix == ".md" and anchor not in anchors_of(target):
            broken.append(f"{link}: no heading #{anchor} in {target.name}")
    return broken


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_relative_link_resolves(page):
    assert not broken_links(page), broken_links(page)


def test_a_broken_link_or_anchor_is_caught(tmp_path):
    (tmp_path / "other.md").write_text("# Other page\n\n## A `--flag` section\n")
    page = tmp_path / "page.md"
    page.write_text("[ok](other.md#a---flag-section) [gone](missing.md) [bad](other.md#nope) `[code](x.md)`\n")
    assert broken_links(page) == [
        f"missing.md: no file {tmp_path / 'missing.md'}",
        "other.md#nope: no heading #nope in other.md",
    ]


def test_the_readme_is_a_short_guide_that_links_every_docs_page():
    readme = ROOT / "README.md"
    assert len(readme.read_text().splitlines()) <= README_MAX_LINES
    linked = {(readme.parent / link.partition("#")[0]).resolve() for link in relative_links(readme)}
    unlinked = [p.name for p in PAGES[1:] if p.resolve() not in linked]
    assert not unlinked, f"docs pages the README does not link: {unlinked}"
