"""Every flag of both command lines explains itself and shows its default (or says it is required)."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from DiffusionSegLib.cli import build_parser as engine_parser
from Training.cli import build_parser as training_parser

UNDOCUMENTED = (argparse._HelpAction, argparse._VersionAction)  # -h and --version explain themselves


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    found = {parser.prog: parser}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                found.update(subcommands(sub))
    return found


def in_required_group(parser: argparse.ArgumentParser, action: argparse.Action) -> bool:
    return any(group.required and action in group._group_actions for group in parser._mutually_exclusive_groups)


def undocumented_flags(parser: argparse.ArgumentParser) -> list[str]:
    """'prog --flag: why' for each flag whose help is missing or does not show its default."""
    problems = []
    for prog, sub in subcommands(parser).items():
        formatter = sub._get_formatter()
        for action in sub._actions:
            if not action.option_strings or isinstance(action, UNDOCUMENTED + (argparse._SubParsersAction,)):
                continue
            flag = f"{prog} {action.option_strings[-1]}"
            if not action.help or action.help == argparse.SUPPRESS:
                problems.append(f"{flag}: no help")
                continue
            text = formatter._expand_help(action)  # what --help prints, %(default)s filled in
            if action.required or in_required_group(sub, action):
                if "required" not in text:
                    problems.append(f"{flag}: required, but the help does not say so")
            elif "default" not in text:
                problems.append(f"{flag}: the help shows no default")
            elif "%(default)" in action.help and action.default is None:
                problems.append(f"{flag}: the help shows 'None' as the default")
    return problems


@pytest.mark.parametrize("build", [engine_parser, training_parser], ids=["diffusionseg", "diffusionseg-train"])
def test_every_flag_has_help_with_its_default(build):
    assert undocumented_flags(build()) == []


def test_the_check_catches_a_bare_flag():
    parser = argparse.ArgumentParser(prog="x")
    sub = parser.add_subparsers().add_parser("run")
    sub.add_argument("--plain", type=int, default=3)
    sub.add_argument("--told", type=int, default=3, help="a number (default: %(default)s)")
    sub.add_argument("--vague", help="a value")
    sub.add_argument("--must", required=True, help="a value")
    assert undocumented_flags(parser) == ["x run --plain: no help", "x run --vague: the help shows no default",
                                          "x run --must: required, but the help does not say so"]


def test_finetune_synopsis_in_readme_names_every_flag():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    section = readme.split("## The `diffusionseg` command", 1)[1].split("\n## ", 1)[0]
    finetune = subcommands(engine_parser())["diffusionseg finetune"]
    named = [a.option_strings for a in finetune._actions if a.option_strings and not isinstance(a, argparse._HelpAction)]
    missing = [flags[-1] for flags in named if not any(re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", section) for flag in flags)]
    assert missing == []
