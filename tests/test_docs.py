"""The docs cannot go stale: generated option tables match `configs/`, every registered component and
every verb is documented, and every `archifactory` command in a fenced code block still composes.

Commands are read from the fenced blocks of README.md and docs/*.md whose language is bash, sh, shell,
console or none (a `text` block holds usage synopses, not runnable lines). Each is checked cheaply, in
process, without training anything: `train`/`data prepare`/`sft` overrides are composed with Hydra's
compose API over the project's config dir (every value of a sweep once), validated and resolved; `eval`,
`generate` and `export` arguments go through the verbs' own parsers. A line with a placeholder —
`<run>`-style angle brackets, `…`, or a shell variable `$X` after the verb — cannot run as written and is
reported as skipped with the placeholder named.
"""

from __future__ import annotations

import importlib.util
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from archifactory.cli.hydra_app import check_group_choices
from archifactory.cli.main import VERBS
from archifactory.config.compose import GROUPS
from archifactory.config.validation import validate_config
from archifactory.core.registry import components
from tests.helpers import compose_config

ROOT = Path(__file__).resolve().parent.parent
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
COMMAND_LANGUAGES = {"", "bash", "sh", "shell", "console"}
PLACEHOLDER = re.compile(r"<[^<>]*>|…|\$\w+")
FENCE = re.compile(r"^\s*(```+|~~~+)\s*([\w-]*)")


def load_generator():
    """scripts/gen_docs_tables.py as a module (scripts/ is not a package)."""
    spec = importlib.util.spec_from_file_location("gen_docs_tables", ROOT / "scripts" / "gen_docs_tables.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def generated_region(text: str, group: str) -> str:
    match = re.search(
        rf"<!-- BEGIN GENERATED: {re.escape(group)} -->\n(.*?)<!-- END GENERATED -->", text, re.S
    )
    assert match, f"docs/configuration.md has no generated table for {group!r}"
    return match.group(1)


def test_generated_tables_are_current() -> None:
    stale = load_generator().stale(ROOT)
    assert not stale, (
        f"out-of-date generated tables in {[str(p.relative_to(ROOT)) for p in stale]}; "
        "run python scripts/gen_docs_tables.py"
    )


@pytest.mark.parametrize("group", GROUPS)
def test_every_config_group_has_a_generated_table(group: str) -> None:
    region = generated_region((ROOT / "docs" / "configuration.md").read_text(), group)
    options = load_generator().group_options(group)
    missing = [name for name in options if f"`{group}={name}`" not in region]
    assert options and not missing, f"{group} options missing from docs/configuration.md: {missing}"


@pytest.mark.parametrize("kind", ["mixin", "ffn", "positional"])
def test_every_registered_component_is_in_its_table(kind: str) -> None:
    region = generated_region((ROOT / "docs" / "configuration.md").read_text(), kind)
    documented = set(re.findall(rf"`{kind}=(\w+)`", region))
    missing = sorted(set(components(kind)) - documented)
    assert not missing, f"registered {kind}s missing from the docs' {kind} table: {missing}"


def test_readme_verbs_table_lists_every_verb() -> None:
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## Verbs\n", 1)[1].split("\n## ", 1)[0]
    first_cells = [line.split("|")[1] for line in section.splitlines() if line.startswith("| `archifactory ")]
    documented = {re.match(r"\s*`archifactory (\w+)", cell).group(1) for cell in first_cells}
    assert documented == set(VERBS), (
        f"README verbs table: missing {set(VERBS) - documented}, unknown {documented - set(VERBS)}"
    )


@dataclass(frozen=True)
class Command:
    where: str  # file:line
    verb: str
    args: tuple[str, ...]


def fenced_lines(path: Path):
    """(line number, line) of the command-language fenced blocks, `\\` continuations joined."""
    language, pending, start = None, "", 0
    for number, line in enumerate(path.read_text().splitlines(), 1):
        fence = FENCE.match(line)
        if fence:
            language = None if language is not None else fence.group(2)
            continue
        if language not in COMMAND_LANGUAGES:
            continue
        if not pending:
            start = number
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        yield start, pending + line
        pending = ""


def commands() -> list[Command]:
    found = []
    for path in DOCUMENTS:
        for number, line in fenced_lines(path):
            for part in line.strip().removeprefix("$ ").split("&&"):
                tokens = shlex.split(part, comments=True)
                if "archifactory" not in tokens:
                    continue
                rest = [t for t in tokens[tokens.index("archifactory") + 1 :] if t != "--debug"]
                if rest:
                    found.append(Command(f"{path.relative_to(ROOT)}:{number}", rest[0], tuple(rest[1:])))
    return found


def params() -> list:
    """One test case per command; a line with a placeholder is skipped, naming the placeholder."""
    cases = []
    for command in commands():
        placeholder = PLACEHOLDER.search(" ".join(command.args))  # `<probe run>` spans two arguments
        marks = (
            [pytest.mark.skip(reason=f"{command.where}: placeholder {placeholder.group()!r}")]
            if placeholder
            else []
        )
        cases.append(pytest.param(command, id=f"{command.where} {command.verb}", marks=marks))
    return cases


def variants(args: list[str]) -> list[list[str]]:
    """Override lists that cover every value of every sweep once (the other sweeps at their first value)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    overrides = OverridesParser.create().parse_overrides(check_group_choices(args))
    values = [
        [f"{o.get_key_element()}={v}" for v in o.sweep_string_iterator()]
        if o.is_sweep_override()
        else [o.input_line]
        for o in overrides
    ]
    base = [choices[0] for choices in values]
    result = [base]
    for i, choices in enumerate(values):
        result += [[*base[:i], choice, *base[i + 1 :]] for choice in choices[1:]]
    return result


def check_composes(args: list[str], chat: bool = False) -> None:
    for overrides in variants(args):
        cfg = compose_config(overrides)  # tests/helpers.py: each distinct composition once per test process
        validate_config(cfg)
        OmegaConf.to_container(cfg, resolve=True)
        if chat:
            assert cfg.dataset.get("source") == "chat", f"{overrides}: sft needs chat data"


def hydra_args(args: tuple[str, ...]) -> list[str]:
    """The overrides of a Hydra verb, without its flags (`-m`, `--cfg job`, `--help`)."""
    out, skip = [], False
    for arg in args:
        if skip:
            skip = False
        elif arg in ("--cfg", "-c"):
            skip = True
        elif not arg.startswith("-"):
            out.append(arg)
    return out


@pytest.mark.parametrize("command", params())
def test_doc_command_runs(command: Command) -> None:
    from archifactory.cli.eval import RUNNERS, parse, plan
    from archifactory.cli.generate import EXPORT_OPTIONS, GENERATE_OPTIONS, parse_options

    args = list(command.args)
    assert command.verb in VERBS, f"{command.where}: unknown verb {command.verb!r}"
    if command.verb == "train":
        check_composes(hydra_args(command.args))
    elif command.verb == "data":
        assert args[:1] == ["prepare"], f"{command.where}: `data` takes `prepare`"
        check_composes(hydra_args(command.args[1:]))
    elif command.verb == "sft":  # composed as `sft` composes it; init_from's run need not exist here
        rest = hydra_args(command.args)
        assert any(a.startswith("init_from=") for a in rest), f"{command.where}: sft needs init_from=<run>"
        trainer = [] if any(a.startswith("trainer=") for a in rest) else ["trainer=sft"]
        check_composes([*rest, *trainer], chat=True)
    elif command.verb == "eval":
        request = parse(args)
        plan(request.names, request.extra)
        dataset = [a for a in request.extra if a.split("=")[0].split(".")[0] in RUNNERS["perplexity"].accepts]
        if dataset:  # perplexity's dataset=…: composed as the runner composes it
            check_composes(dataset)
    elif command.verb == "generate":
        options = parse_options(args, GENERATE_OPTIONS, "generate")
        assert ("prompt" in options) != ("prompt_file" in options), (
            f"{command.where}: prompt= or prompt_file="
        )
    elif command.verb == "export":
        parse_options(args, EXPORT_OPTIONS, "export")
    elif command.verb == "list":
        if args:
            assert args[0] == "--params", f"{command.where}: `list` takes nothing or --params"
            check_composes(args[1:])
    elif command.verb == "report":
        assert args and not any("=" in a for a in args if not a.startswith("--")), f"{command.where}: paths"


def test_doc_commands_are_found() -> None:
    """The extraction itself: the quickstart and a sweep are among the checked commands."""
    found = {(c.verb, c.args) for c in commands()}
    assert ("train", ("experiment=tinystories_quick",)) in found
    assert ("train", ("-m", "mixin=gqa,rwkv6,mamba2")) in found
