"""The README and docs/ cannot drift from the code.

- Every `lora-exp ...` line in README.md and docs/*.md composes with Hydra's compose API. This covers fenced
  bash/console blocks and inline code. A documented error (`$ lora-exp ...` followed by `error: ...`) must fail
  with that exact line.
- Every usage line of `lora_exp/cli.py`'s docstring is quoted in the README, and every subcommand that the docs
  use is one of them.
- The README is at most 200 lines.
- Every relative link resolves: the file exists, and so does a `#heading` anchor.
- Every repository path that the docs name (`scripts/...`, `lora_exp/...`, `conf/...`, ...) exists.
"""

from __future__ import annotations

import functools
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir, initialize_config_module
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf

from lora_exp.config import cmdline
from lora_exp.config.checks import validate
from lora_exp.config.schema import CONF_DIR, register_configs

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
README_MAX_LINES = 200
# Fenced blocks whose lines are commands; ```text blocks hold diagrams, output and usage text.
COMMAND_FENCES = {"", "bash", "sh", "shell", "console"}
# Command-line flags of the Hydra app that take a value, and those that take none.
FLAGS_WITH_VALUE = {"--cfg", "-c", "--config-dir", "-cd", "--config-name", "-cn", "--config-path", "-cp"}
FLAGS_WITH_VALUE |= {"--package", "-p", "--info", "-i"}
FLAGS_ALONE = {"-m", "--multirun", "--resolve", "--help", "-h", "--hydra-help"}
# Paths inside the repository that the docs may name; a component in capitals (RUN_DIR, NAME) is a placeholder.
REPO_PATH = re.compile(r"(?<![\w./$~-])((?:lora_exp|scripts|conf|sweeps|notebooks|docs|tests|\.ci)/[\w./-]*)")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


@dataclass(frozen=True)
class Command:
    """One documented `lora-exp ...` line: where it is, its text, and the error line documented after it."""

    page: str
    line: int
    text: str
    error: str | None = None

    @property
    def words(self) -> list[str]:
        """The command's words after `lora-exp`, without a trailing `# comment`."""
        return shlex.split(re.split(r"\s#\s", self.text, maxsplit=1)[0])[1:]

    @property
    def subcommand(self) -> str | None:
        """The subcommand (report, predict, ...), or None for a training job or a multirun."""
        words = self.words
        return words[0] if words and re.fullmatch(r"[a-z][a-z-]*", words[0]) else None


def _inline_code(line: str) -> list[str]:
    return re.findall(r"`([^`]+)`", line)


def commands(page: Path) -> list[Command]:
    """Every `lora-exp ...` line of a page: in command fences (a `$ ` prompt allowed) and in inline code."""
    found: list[Command] = []
    lines = page.read_text().splitlines()
    fence: str | None = None
    for number, raw in enumerate(lines, start=1):
        stripped = raw.strip()
        if stripped.startswith("```"):
            fence = stripped[3:].strip() if fence is None else None
            continue
        if fence is not None:
            text = stripped.removeprefix("$ ")
            if raw.rstrip().endswith("\\") and fence in COMMAND_FENCES:  # a command continued on the next lines
                continue
            start = number - 1
            while start > 0 and lines[start - 1].rstrip().endswith("\\"):
                start -= 1
            if start < number - 1:  # the last line of a continued command: the whole command, joined
                text = " ".join(line.strip().removesuffix("\\").strip() for line in lines[start:number])
                text = text.removeprefix("$ ")
            if fence in COMMAND_FENCES and (text == "lora-exp" or text.startswith("lora-exp ")):
                after = lines[number].strip() if number < len(lines) else ""
                error = after if after.startswith("error") else None
                found.append(Command(page.name, number, text, error))
            continue
        for code in _inline_code(raw):
            if code.startswith("lora-exp "):
                found.append(Command(page.name, number, code))
    return found


ALL_COMMANDS = [c for page in PAGES for c in commands(page)]
TRAINING_COMMANDS = [c for c in ALL_COMMANDS if c.subcommand is None]


def overrides(command: Command) -> list[str]:
    """The Hydra overrides of a training or multirun line: flags, `...` and usage placeholders (`[...]`) left out."""
    words, kept, skip = command.words, [], False
    for word in words:
        if skip:
            skip = False
        elif word in FLAGS_WITH_VALUE:
            skip = True
        elif word in FLAGS_ALONE or word.startswith("...") or word.startswith("["):
            continue
        else:
            kept.append(word)
    return kept


def jobs(arguments: list[str]) -> list[list[str]]:
    """The overrides of the jobs to compose: a multirun's sweep axes expanded by Hydra's own parser, so that
    each value of each axis is composed at least once (job i takes value i mod n of every axis)."""
    parsed = OverridesParser.create().parse_overrides(arguments)
    axes = [[values[0] for values in BasicSweeper.split_arguments([p], None)[0]] for p in parsed]
    return [[axis[i % len(axis)] for axis in axes] for i in range(max((len(a) for a in axes), default=1))]


def compose_job(arguments: list[str]) -> DictConfig:
    """Check the overrides as `lora-exp` does (closed config) and compose them with Hydra's compose API, on the
    config dir the app uses (a `pkg://` module when the configs ship inside the package)."""
    return _compose(tuple(arguments))


@functools.cache  # the same line in two pages is composed once
def _compose(arguments: tuple[str, ...]) -> DictConfig:
    register_configs()
    cmdline.check_overrides(list(arguments))
    if CONF_DIR.startswith("pkg://"):
        context = initialize_config_module(config_module=CONF_DIR.removeprefix("pkg://"), version_base="1.3")
    else:
        context = initialize_config_dir(config_dir=CONF_DIR, version_base="1.3")
    with context:
        return compose(config_name="config", overrides=list(arguments))


COMPOSED: set[str] = set()  # every config-group choice that some composed job held (`+preset=dora`)


def one_line(err: BaseException) -> str:
    """An error as `lora-exp` prints it: its lines joined with ' | '."""
    return " | ".join(line.strip() for line in str(err).strip().splitlines() if line.strip())


def _id(command: Command) -> str:
    return f"{command.page}:{command.line}"


def test_the_docs_hold_commands_of_every_kind() -> None:
    pages = {c.page for c in ALL_COMMANDS}
    assert {"README.md", "configuration.md", "methods.md", "sweeps.md", "results.md", "audio.md"} <= pages
    assert any(c.error for c in ALL_COMMANDS), "the documented errors were not found"
    assert any("-m" in c.words for c in TRAINING_COMMANDS), "no multirun line was found"
    assert any(c.text.startswith("lora-exp +preset=") for c in TRAINING_COMMANDS)


@pytest.mark.parametrize("command", TRAINING_COMMANDS, ids=_id)
def test_documented_command_composes(command: Command) -> None:
    arguments = overrides(command)
    if command.error:
        try:
            validate(compose_job(arguments))
        except Exception as err:  # whatever refuses it (the closed config, Hydra, validate), the line must match
            assert f"error: {one_line(err)}" == command.error, f"{_id(command)}: {command.text}"
            return
        pytest.fail(f"{_id(command)}: {command.text} is documented to fail with {command.error!r}, but composes")
    for number, job in enumerate(jobs(arguments)):
        choices = {o for o in job if "=" in o and "." not in o.split("=", 1)[0]}  # config groups: +preset=dora
        if number and COMPOSED.issuperset(choices):
            cmdline.check_overrides(job)  # only values change (trainer.seed=2): the closed config checks them
            continue
        COMPOSED.update(choices)
        cfg = compose_job(job)
        body = OmegaConf.create({key: cfg[key] for key in cfg if key != "hydra"})
        resolved = OmegaConf.to_container(body, resolve=True)
        assert isinstance(resolved, dict) and resolved["method"]["name"], f"{_id(command)}: {job}"


def test_old_preset_spelling_is_not_documented() -> None:
    stale = [_id(c) for c in ALL_COMMANDS if any(w.startswith(("+variant=", "variant=")) for w in c.words)]
    assert not stale, f"+variant= is now +preset=: {stale}"


def _usage_commands() -> list[str]:
    from lora_exp.cli import usage

    return [re.split(r"\s{2,}", line.strip())[0] for line in usage().splitlines() if line.strip()]


def test_readme_quotes_every_usage_line_of_the_cli() -> None:
    readme = (ROOT / "README.md").read_text()
    missing = [line for line in _usage_commands() if line not in readme]
    assert not missing, f"lora_exp/cli.py's usage lines missing from README.md: {missing}"


def test_documented_subcommands_exist() -> None:
    known = {shlex.split(line.replace('"..."', "x"))[1] for line in _usage_commands()}
    used = {c.subcommand: _id(c) for c in ALL_COMMANDS if c.subcommand}
    assert used, "no subcommand line was found"
    unknown = {sub: where for sub, where in used.items() if sub not in known}
    assert not unknown, f"subcommands not in lora_exp/cli.py's usage: {unknown}"


def test_readme_is_short() -> None:
    lines = len((ROOT / "README.md").read_text().splitlines())
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines (at most {README_MAX_LINES})"


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    return {_slug(m) for m in re.findall(r"^#{1,6}\s+(.+)$", text, flags=re.M)}


def test_relative_links_resolve() -> None:
    broken = []
    for page in PAGES:
        for target in LINK.findall(page.read_text()):
            if re.match(r"[a-z]+:", target):
                continue  # http(s), mailto
            path, _, anchor = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            if not file.exists():
                broken.append(f"{page.name}: {target} (no such file)")
            elif anchor and file.suffix == ".md" and anchor not in _anchors(file):
                broken.append(f"{page.name}: {target} (no such heading)")
    assert not broken, broken


def test_named_repository_paths_exist() -> None:
    missing = []
    for page in PAGES:
        for path in REPO_PATH.findall(page.read_text()):
            path = path.rstrip(".")
            if any(re.fullmatch(r"[A-Z][A-Z0-9_]*(\.\w+)?", part) for part in path.split("/")):
                continue  # a placeholder: sweeps/NAME.yaml
            if not (ROOT / path).exists():
                missing.append(f"{page.name}: {path}")
    assert not missing, missing
