"""Issue #14 for the command lines: every `python -m MODULE ...` line in README.md parses with that module's
own parser, and options may come before, between or after the positionals (`parse_intermixed_args`).
Nothing runs: each module exposes `parser()` (and `parse_args(argv)` where it checks combinations)."""

from __future__ import annotations

import argparse
import importlib
import itertools
import os
import re
import shlex

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def readme_commands() -> list[str]:
  """Every `python -m ...` line of README.md's code blocks (backslash continuations joined)."""
  with open(os.path.join(ROOT, "README.md")) as f:
    blocks = re.findall(r"^```[a-z]*\n(.*?)^```", f.read(), re.S | re.M)
  lines = (line.strip() for block in blocks for line in block.replace("\\\n", " ").splitlines())
  return [line for line in lines if line.startswith("python -m ")]


def expand(tokens: list[str]) -> list[list[str]]:
  """The command lines a usage stands for: each `[...]` group left out or given, each of its `A | B`
  alternatives in turn (`[--dtype bfloat16]`, `[a.bin | b.pth]`)."""
  choices, index = [], 0
  while index < len(tokens):
    if not tokens[index].startswith("["):
      choices.append([[tokens[index]]])
      index += 1
      continue
    end = next(i for i in range(index, len(tokens)) if tokens[i].endswith("]"))
    group = [*tokens[index:end + 1]]
    group[0], group[-1] = group[0][1:], group[-1][:-1]
    alternatives = [list(g) for is_bar, g in itertools.groupby(filter(None, group), lambda t: t == "|") if not is_bar]
    choices.append([[], *alternatives])
    index = end + 1
  return [[token for part in combination for token in part] for combination in itertools.product(*choices)]


def parse(module_name: str, argv: list[str]) -> argparse.Namespace:
  """`argv` parsed as `python -m module_name` would, without running it."""
  module = importlib.import_module(module_name)
  if hasattr(module, "parse_args"):
    return module.parse_args(argv)
  return module.parser().parse_intermixed_args(argv)


COMMANDS = readme_commands()


def test_the_readme_has_the_commands_this_test_reads():
  modules = {shlex.split(line, comments=True)[2] for line in COMMANDS}
  assert {"conversion.whisper", "conversion.llm", "conversion.ltu_as", "ltu_jax.extract_features"} <= modules
  assert len(COMMANDS) >= 10


@pytest.mark.parametrize("line", COMMANDS, ids=[f"{shlex.split(line)[2]}-{i}" for i, line in enumerate(COMMANDS)])
def test_every_readme_command_parses(line, capsys):
  _, _, module, *usage = shlex.split(line, comments=True)
  for argv in expand(usage):
    try:
      parse(module, argv)
    except SystemExit:
      pytest.fail(f"README's {line!r} as {argv} does not parse:\n{capsys.readouterr().err}")


def test_readme_usage_is_expanded_into_each_command_it_stands_for():
  usage = shlex.split("[a.bin | b.pth] --llm L OUT [--dtype bfloat16]")
  assert expand(usage) == [
    ["--llm", "L", "OUT"], ["--llm", "L", "OUT", "--dtype", "bfloat16"],
    ["a.bin", "--llm", "L", "OUT"], ["a.bin", "--llm", "L", "OUT", "--dtype", "bfloat16"],
    ["b.pth", "--llm", "L", "OUT"], ["b.pth", "--llm", "L", "OUT", "--dtype", "bfloat16"],
  ]


ORDERS = {  # module: the same command with options first, between and last
  "conversion.ltu_as": [
    ["--llm", "L", "--whisper", "W", "SRC", "OUT"], ["SRC", "--llm", "L", "--whisper", "W", "OUT"],
    ["SRC", "OUT", "--llm", "L", "--whisper", "W"],
  ],
  "conversion.ltu": [["--llm", "L", "SRC", "OUT"], ["SRC", "--llm", "L", "OUT"], ["SRC", "OUT", "--llm", "L"]],
  "conversion.llm": [["--dtype", "bfloat16", "SRC", "OUT"], ["SRC", "--dtype", "bfloat16", "OUT"], ["SRC", "OUT", "--dtype", "bfloat16"]],
  "conversion.whisper": [["--tokenizer", "T", "SRC", "OUT"], ["SRC", "--tokenizer", "T", "OUT"], ["SRC", "OUT", "--tokenizer", "T"]],
  "ltu_jax.pretrain_tltr": [
    ["--model", "M", "--data", "D", "--features", "F", "OUT"], ["--model", "M", "OUT", "--data", "D", "--features", "F"],
    ["OUT", "--model", "M", "--data", "D", "--features", "F"],
  ],
  "ltu_jax.tiny_data": [["--train", "4", "--seed", "1", "OUT"], ["--train", "4", "OUT", "--seed", "1"], ["OUT", "--train", "4", "--seed", "1"]],
  "ltu_jax.extract_features": [
    ["--data", "a.json", "b.json", "--whisper", "W", "--out", "F"], ["--whisper", "W", "--out", "F", "--data", "a.json", "b.json"],
  ],
  "ltu_jax.tiny": [["--smoke", "--limit", "3"], ["--limit", "3", "--smoke"]],
}


@pytest.mark.parametrize("module", sorted(ORDERS))
def test_options_may_come_before_between_or_after_positionals(module):
  parsed = [vars(parse(module, argv)) for argv in ORDERS[module]]
  assert all(p == parsed[0] for p in parsed), parsed
  if module == "conversion.ltu_as":
    assert parsed[0]["paths"] == ["SRC", "OUT"] and parsed[0]["llm"] == "L"
