"""The documentation can't drift from the code: every glmtune command shown in README.md and docs/ names a real
command and only options that command accepts, its links lead somewhere, and the README's test command is the one
CI runs."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import io
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

from glmtune.cli import COMMANDS
from glmtune.cli import main as glmtune_main

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"

# The seed's scripts run these commands (finetune.py is `glmtune train`, ...).
SEED_SCRIPTS = {"tokenize_dataset_rows.py": "prepare", "finetune.py": "train", "infer.py": "infer"}
TOP_LEVEL_OPTIONS = {"-h", "--help", "--version"}
# Fenced blocks that hold command lines; python, json, yaml... blocks are not read.
SHELL_BLOCKS = {"", "bash", "sh", "shell", "console", "text"}
SEPARATORS = {"|", "||", "&", "&&", ";", "(", ")"}
REDIRECTS = {">", ">>", "<", "2>", "&>"}


@dataclass(frozen=True)
class ShownCommand:
    where: str  # file:line
    verb: str | None  # None: `glmtune` alone or with top-level options only
    flags: tuple[str, ...]


def doc_files() -> list[Path]:
    return [README, *sorted(DOCS.rglob("*.md"))]


def shown_commands(path: Path) -> tuple[list[ShownCommand], list[str]]:
    """The glmtune commands in a Markdown file's shell blocks (backslash continuations joined) and inline code
    spans, and the lines that could not be read as shell."""
    commands: list[ShownCommand] = []
    problems: list[str] = []
    name = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
    fence: str | None = None  # the open block's language, None outside blocks
    pending, start = "", 0
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        stripped = line.strip()
        if stripped.startswith(("```", "~~~")):
            fence = stripped.strip("`~").strip().lower() if fence is None else None
            pending = ""
            continue
        if fence is None:
            for span in re.findall(r"`([^`]+)`", line):
                if re.match(r"(\S*/)?glmtune\s|python\S* -m glmtune\s", span):
                    commands += _commands_in(span, f"{name}:{number}", problems)
            continue
        if fence not in SHELL_BLOCKS:
            continue
        if not pending:
            start = number
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        commands += _commands_in(pending + stripped, f"{name}:{start}", problems)
        pending = ""
    return commands, problems


def _commands_in(text: str, where: str, problems: list[str]) -> list[ShownCommand]:
    if "glmtune" not in text and not any(script in text for script in SEED_SCRIPTS):
        return []  # a directory tree, a curl line: nothing to read
    lexer = shlex.shlex(text, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    try:
        tokens = list(lexer)
    except ValueError as e:
        problems.append(f"{where}: can't read as a shell command ({e}): {text}")
        return []
    commands = []
    segment: list[str] = []
    for token in [*tokens, ";"]:
        if token in SEPARATORS:
            command = _glmtune_command(segment, where)
            commands += [command] if command else []
            segment = []
        else:
            segment.append(token)
    return commands


def _glmtune_command(tokens: list[str], where: str) -> ShownCommand | None:
    """The glmtune invocation in one simple command: `glmtune VERB`, `.venv/bin/glmtune VERB`, `... -m glmtune VERB`
    (python, torchrun, accelerate launch) or `python SEED_SCRIPT.py`."""
    verb_at, verb = None, None
    for i, token in enumerate(tokens):
        if token == "glmtune" or token.endswith("/glmtune"):
            verb_at = i + 1
            verb = tokens[i + 1] if i + 1 < len(tokens) and not tokens[i + 1].startswith("-") else None
            break
        if Path(token).name in SEED_SCRIPTS and i > 0 and "python" in Path(tokens[i - 1]).name:
            verb_at, verb = i, SEED_SCRIPTS[Path(token).name]
            break
    if verb_at is None:
        return None
    flags, skip = [], False
    for token in tokens[verb_at:]:
        if skip or token in REDIRECTS:
            skip = token in REDIRECTS
            continue
        flag = token.lstrip("[").rstrip("]").split("=")[0]
        if flag.startswith("--") or flag == "-h":
            flags.append(flag)
    return ShownCommand(where, verb, tuple(flags))


@functools.cache
def command_options(verb: str) -> frozenset[str]:
    """The options `glmtune VERB` accepts: those its --help lists (rendered from the command's own dataclasses,
    which a test in test_cli.py holds equal to the real parser's), and for train and dpo every field of the
    transformers / TRL configuration they also parse."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
        glmtune_main([verb, "--help"])
    options = {"-h"}
    for line in out.getvalue().splitlines():  # "  --data DATA, --jsonl_path DATA   help text": every name it lists
        invocation = re.match(r"  (-\S.*)", line)
        if invocation:
            options |= set(re.findall(r"--\w+", re.split(r" {2,}", invocation.group(1))[0]))
    if verb in ("train", "dpo"):
        from transformers import TrainingArguments

        options |= {"--help_all"} | {f"--{f.name}" for f in dataclasses.fields(TrainingArguments) if f.init}
    if verb == "dpo":
        from trl import DPOConfig

        options |= {f"--{f.name}" for f in dataclasses.fields(DPOConfig) if f.init}
    return frozenset(options)


def unknown_in(commands: list[ShownCommand]) -> list[str]:
    """One line per unknown command or option, with the file:line that shows it."""
    problems = []
    for command in commands:
        if command.verb is None:
            accepted = TOP_LEVEL_OPTIONS
        elif command.verb.isupper():  # a placeholder (`glmtune COMMAND --help`): what every command accepts
            accepted = frozenset.intersection(*map(command_options, COMMANDS))
        elif command.verb not in COMMANDS:
            problems.append(f"{command.where}: unknown command 'glmtune {command.verb}'")
            continue
        else:
            accepted = command_options(command.verb)
        name = f"glmtune {command.verb}" if command.verb else "glmtune"
        problems += [f"{command.where}: {name} has no option {flag}" for flag in command.flags if flag not in accepted]
    return problems


def check(paths: list[Path]) -> tuple[int, list[str]]:
    """How many commands the files show, and every problem with them."""
    commands, problems = [], []
    for path in paths:
        found, unreadable = shown_commands(path)
        commands += found
        problems += unreadable
    return len(commands), problems + unknown_in(commands)


def test_every_command_in_the_readme_and_docs_exists_with_the_options_it_shows():
    count, problems = check(doc_files())
    assert count > 50, f"only {count} commands found in the docs: is the scanner broken?"
    assert not problems, f"{len(problems)} problem(s):\n" + "\n".join(problems)


def test_the_scanner_reads_continued_lines_launchers_and_the_seed_scripts(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(
        "Run `glmtune plan --model M --max_seq_length 1024`.\n\n"
        "```bash\n"
        "torchrun --nproc_per_node 2 -m glmtune train --dataset_path D \\\n"
        "    --output_dir O   # a comment's apostrophe: it's fine\n"
        "accelerate launch --config_file x.yaml -m glmtune dpo --beta 0.1\n"
        "python finetune.py --dataset_path d [--fp16]\n"
        "printf 'q\\n' | GLMTUNE_API_KEY=k .venv/bin/glmtune chat --prompt hi > out.txt && glmtune --version\n"
        "```\n"
        "```python\nglmtune.main(['train', '--not_read'])\n```\n", encoding="utf-8")
    commands, problems = shown_commands(page)
    assert not problems
    assert [(c.where.split(":")[-1], c.verb, c.flags) for c in commands] == [
        ("1", "plan", ("--model", "--max_seq_length")),
        ("4", "train", ("--dataset_path", "--output_dir")),
        ("6", "dpo", ("--beta",)),
        ("7", "train", ("--dataset_path", "--fp16")),
        ("8", "chat", ("--prompt",)),
        ("8", None, ("--version",)),
    ]


def test_a_made_up_command_or_option_is_reported_with_its_file_and_line(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# Page\n\n```bash\nglmtune train --dataset_path d \\\n  --no_such_flag 1\n"
                    "glmtune prepare --save_path x --bogus\nglmtune trian --help\n```\n", encoding="utf-8")
    count, problems = check([page])
    assert count == 3
    assert problems == [f"{page}:4: glmtune train has no option --no_such_flag",
                        f"{page}:6: glmtune prepare has no option --bogus",
                        f"{page}:7: unknown command 'glmtune trian'"]


def heading_anchors(path: Path) -> set[str]:
    """The #anchors GitHub gives a Markdown file's headings: lower case, punctuation dropped, spaces as hyphens."""
    text = re.sub(r"```.*?```", "", path.read_text(encoding="utf-8"), flags=re.DOTALL)
    return {re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
            for heading in re.findall(r"^#+ (.+)$", text, flags=re.MULTILINE)}


def test_every_relative_link_in_the_readme_and_docs_leads_to_a_file_and_heading():
    broken = []
    for path in doc_files():
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            for target in re.findall(r"\]\(([^)\s]+)\)", line):
                if re.match(r"[a-z]+:", target):
                    continue
                file, _, anchor = target.partition("#")
                linked = (path.parent / file) if file else path
                if not linked.exists() or anchor and (linked.suffix != ".md" or anchor not in heading_anchors(linked)):
                    broken.append(f"{path.relative_to(ROOT)}:{number}: {target}")
    assert not broken, "\n".join(broken)


def test_the_readme_is_a_doorway_that_links_every_docs_page():
    text = README.read_text(encoding="utf-8")
    assert len(text.encode("utf-8")) <= 8 * 1024
    index = (DOCS / "README.md").read_text(encoding="utf-8")
    pages = {p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md")} - {"README.md"}
    assert pages == {p for p in pages if f"({p})" in index}, "docs/README.md must list every page"
    assert "(docs/README.md)" in text


def test_ci_runs_the_readmes_setup_and_test_command():
    command = "bash scripts/setup.sh && .venv/bin/python -m pytest -q"
    assert command in README.read_text(encoding="utf-8")
    assert command in (ROOT / ".ci" / "run").read_text(encoding="utf-8")


def test_ci_runs_the_numeric_tests_again_with_autos_other_cpu_choice():
    """As docs/install.md says: the tests marked numeric hold with fp32 and with bf16, whatever this CPU has."""
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert re.search(r"^GLMTUNE_CPU_BF16=\$other \.venv/bin/python -m pytest -q -m numeric$", ci, flags=re.MULTILINE)


# A measured figure: a number with a unit or a ratio ("1.55x", "3%", "7.86 GiB", "0.62 s/step", "457 tokens/s"), a
# difference ("1.1e-6"), or a table cell holding a number.
FIGURE = re.compile(r"\d(?:[\d,.]*\d)?\s*(?:x\b|%|GiB|MiB|MB|s/step|s\b|tokens/s|rows/s)|\d\.?\d*e-\d"
                    r"|^\|.*\|\s*[\d.,]+\s*\|", re.MULTILINE)
# What reproduces it: a bench script or a glmtune command, in a shell block or an inline code span.
REPRODUCER = re.compile(r"bench/\S+|(?:^|[\s`/])glmtune\s")


def sections_without_their_command(text: str) -> list[str]:
    """The headings of the `##` sections that give a measured figure (in prose or a table) but neither show the
    command that reproduces it nor say that the command was not recorded."""
    missing = []
    for section in re.split(r"^(?=## )", text, flags=re.MULTILINE)[1:]:
        heading, _, body = section.partition("\n")
        code = re.findall(r"```[^\n]*\n(.*?)```", body, flags=re.DOTALL) + re.findall(r"`([^`\n]+)`", body)
        figures = FIGURE.search(re.sub(r"```.*?```|`[^`\n]+`", "", body, flags=re.DOTALL))
        said_unrecorded = "not recorded" in " ".join(body.split())
        if figures and not said_unrecorded and not any(REPRODUCER.search(span) for span in code):
            missing.append(heading)
    return missing


def test_every_benchmark_figure_stands_next_to_the_command_that_reproduces_it():
    text = (DOCS / "benchmarks.md").read_text(encoding="utf-8")
    assert len(re.findall(r"^## ", text, flags=re.MULTILINE)) >= 8  # the sections were found
    assert sections_without_their_command(text) == []


def test_a_benchmark_figure_without_its_command_is_reported():
    figure = "Measured today: 2.1x the baseline, 1.3 GiB.\n"
    assert sections_without_their_command(f"# B\n\n## Speed\n\n{figure}") == ["## Speed"]
    assert sections_without_their_command(f"## Speed\n\n```bash\n.venv/bin/python bench/x.py\n```\n\n{figure}") == []
    assert sections_without_their_command(f"## Speed\n\n{figure}Run `.venv/bin/glmtune demo`.\n") == []
    assert sections_without_their_command(f"## Speed\n\n{figure}The exact command was not recorded.\n") == []
    assert sections_without_their_command("## Words\n\nNo figure here, only `bench/x.py`.\n") == []
    assert sections_without_their_command("## Table\n\n| way | tokens |\n|---|---|\n| one | 1256 |\n") == ["## Table"]
