"""Every command the documentation shows parses with the real argument parsers.

The fenced code blocks of README.md, docs/*.md and experiments/RESULTS.md are scanned for
``lclsc ...`` and ``python experiments/....py ...`` command lines (line continuations joined,
``# comments`` dropped, ``[--flag]`` optional parts tried both ways). Each ``lclsc`` command is
parsed by ``lclsc_jax.cli.build_parser()``, each script command by the script's own parser, so a
renamed flag in the code, or a typo in the docs, fails here. Parsing touches no file, so
placeholders (``FILE``, ``/path/to/...``) are fine; integer placeholders (``N``, ``i``) and shell
variables (``$SLURM_ARRAY_TASK_ID``) are given sample values. That the core commands really run
is tested end to end in test_cli.py and test_cli_user_data.py.
"""

from __future__ import annotations

import argparse
import re
import runpy
import shlex
import sys
from pathlib import Path

import pytest

from lclsc_jax import cli

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "experiments" / "RESULTS.md"]
#: Placeholders the docs use for integer arguments, with a value to parse them with.
INT_PLACEHOLDERS = {"N": "2", "i": "0", "K": "5"}
_FENCE = re.compile(r"^[ \t]*(```|~~~)[^\n]*\n(.*?)^[ \t]*\1[ \t]*$", re.S | re.M)
_COMMAND = re.compile(r"^(?:\$\s+)?(?:srun\s+)?(lclsc|python3?\s+experiments/\S+\.py)(\s|$)")
_SHELL_VAR = re.compile(r"\$\{?[A-Za-z_][A-Za-z0-9_]*\}?")
_INLINE = re.compile(r"`((?:lclsc|python3? experiments/[^`\s]+\.py) [^`]*|python3? experiments/[^`\s]+\.py)`")


def doc_commands(paths: list[Path] = DOCS) -> list[tuple[str, list[str]]]:
    """``(where, argv)`` of each documented command: ``where`` is ``file:line``, ``argv[0]`` is
    ``lclsc`` or the script's path (relative to the repository).

    Optional parts written ``[--json]`` give two commands, one without and one with the flag.
    """
    out: list[tuple[str, list[str]]] = []
    for path in paths:
        if not path.exists():
            continue
        text = path.read_text()
        for block in _FENCE.finditer(text):
            first_line = text.count("\n", 0, block.start(2)) + 1
            lines = block.group(2).split("\n")
            i = 0
            while i < len(lines):
                start = i
                line = lines[i]
                while line.rstrip().endswith("\\") and i + 1 < len(lines):  # line continuation
                    i += 1
                    line = line.rstrip()[:-1] + " " + lines[i]
                i += 1
                m = _COMMAND.match(line.strip())
                if not m:
                    continue
                tokens = shlex.split(_SHELL_VAR.sub("0", line.strip()), comments=True)
                if tokens[0] == "$":
                    tokens = tokens[1:]
                if tokens[0] == "srun":
                    tokens = tokens[1:]
                if tokens[0].startswith("python"):
                    tokens = tokens[1:]
                name = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path.name
                where = f"{name}:{first_line + start}"
                for variant in _optional_variants(tokens):
                    out.append((where, variant))
    return out


def inline_commands(paths: list[Path] = DOCS) -> list[tuple[str, list[str]]]:
    """``(where, argv)`` of the commands quoted inline in prose (`` `lclsc cv --lopo` ``), outside fenced blocks.

    These are often fragments (``lclsc train --init-from FILE`` without ``--workdir``): they are
    checked with every argument optional, so only wrong flags, subcommands or values fail.
    """
    out: list[tuple[str, list[str]]] = []
    for path in paths:
        if not path.exists():
            continue
        text = _FENCE.sub(lambda m: "\n" * m.group(0).count("\n"), path.read_text())  # keep line numbers
        for m in _INLINE.finditer(text):
            tokens = shlex.split(_SHELL_VAR.sub("0", m.group(1)))
            if tokens[0].startswith("python"):
                tokens = tokens[1:]
            if tokens[0] == "lclsc" and len(tokens) < 2:
                continue
            name = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path.name
            out.append((f"{name}:{text.count(chr(10), 0, m.start()) + 1}", tokens))
    return out


def _optional_variants(tokens: list[str]) -> list[list[str]]:
    """``a [--x] b`` -> ``[a, b]`` and ``[a, --x, b]``."""
    variants = [[]]
    for t in tokens:
        if t.startswith("[") and t.endswith("]"):
            inner = t[1:-1].split()
            variants = [v for base in variants for v in (base, base + inner)]
        else:
            variants = [v + [t] for v in variants]
    return variants


def _sample(argv: list[str]) -> list[str]:
    return [INT_PLACEHOLDERS.get(a, a) for a in argv]


class _Parsed(Exception):
    """Raised in place of running a script once its arguments have parsed."""


def _all_optional(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """``parser`` (and its subcommands' parsers) with no required argument or group, in place.

    Safe to mutate: every parse builds its parser afresh (``cli.build_parser()`` per call, a
    script's parser per ``runpy`` run), so nothing shared changes.
    """
    for action in parser._actions:  # noqa: SLF001 - argparse keeps its actions private
        action.required = False
        if isinstance(action, argparse._SubParsersAction):  # noqa: SLF001
            for sub in action.choices.values():
                _all_optional(sub)
    for group in parser._mutually_exclusive_groups:  # noqa: SLF001
        group.required = False
    return parser


def parse_command(argv: list[str], capsys: pytest.CaptureFixture | None = None,
                  monkeypatch: pytest.MonkeyPatch | None = None, fragment: bool = False) -> argparse.Namespace:
    """Parse a documented command with its real parser; ``pytest.fail`` with argparse's message if it does not parse.

    ``fragment``: every argument is optional (for commands quoted in prose); wrong flags still fail.
    """
    argv = _sample(argv)
    try:
        if argv[0] == "lclsc":
            parser = cli.build_parser()
            if fragment:
                parser.set_defaults(command=None)
                _all_optional(parser)
            return parser.parse_args(argv[1:])
        script = ROOT / argv[0]
        if not script.is_file():
            pytest.fail(f"{argv[0]}: no such script")
        original = argparse.ArgumentParser.parse_args

        def parse_then_stop(self, args=None, namespace=None):
            raise _Parsed(original(_all_optional(self) if fragment else self, args, namespace))

        assert monkeypatch is not None
        monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
        monkeypatch.setattr(sys, "argv", [str(script), *argv[1:]])
        monkeypatch.syspath_prepend(str(script.parent))
        try:
            runpy.run_path(str(script), run_name="__main__")
        except _Parsed as done:
            return done.args[0]
        pytest.fail(f"{argv[0]} finished without parsing its arguments")
    except SystemExit as e:
        if e.code == 0 and ("--help" in argv or "-h" in argv):
            return argparse.Namespace(help=True)  # `lclsc explain --help`: argparse printed the help
        err = capsys.readouterr().err if capsys is not None else ""
        if fragment and re.search(r"argument \S+: expected (one|at least one) argument\n?$", err.strip() + "\n"):
            return argparse.Namespace()  # prose names a flag without its value: `lclsc explain --torch-weights`
        pytest.fail(f"`{' '.join(argv)}` does not parse (exit {e.code}):\n{err}")


COMMANDS = doc_commands()
INLINE = inline_commands()


def test_the_docs_show_commands():
    """The scan finds the commands (a broken extractor must not pass silently)."""
    subcommands = {argv[1] for _, argv in COMMANDS if argv[0] == "lclsc"}
    assert len(COMMANDS) >= 20, COMMANDS
    assert {"train", "evaluate", "predict", "explain", "cv", "benchmark-cams", "ablate"} <= subcommands
    assert any(argv[0] == "experiments/ablate.py" for _, argv in COMMANDS)


@pytest.mark.parametrize("argv", [c[1] for c in COMMANDS], ids=[f"{w} {' '.join(a[:2])}" for w, a in COMMANDS])
def test_documented_command_parses(argv, capsys, monkeypatch):
    parse_command(argv, capsys, monkeypatch)


@pytest.mark.parametrize("argv", [c[1] for c in INLINE], ids=[f"{w} {' '.join(a[:2])}" for w, a in INLINE])
def test_command_quoted_in_prose_parses(argv, capsys, monkeypatch):
    parse_command(argv, capsys, monkeypatch, fragment=True)


def test_extraction_joins_continuations_drops_comments_and_expands_options(tmp_path):
    doc = tmp_path / "x.md"
    doc.write_text("text `lclsc` and `lclsc_jax.data`\n\n```bash\n# a comment\nlclsc predict --workdir r a.png [--json]  # note\n"
                   "python experiments/ablate.py --out o \\\n    --collect\nmake test\n```\n")
    found = doc_commands([doc])
    assert [a for _, a in found] == [["lclsc", "predict", "--workdir", "r", "a.png"],
                                     ["lclsc", "predict", "--workdir", "r", "a.png", "--json"],
                                     ["experiments/ablate.py", "--out", "o", "--collect"]]
    assert [w.split(":")[-1] for w, _ in found] == ["5", "5", "6"]
    assert [a for _, a in inline_commands([doc])] == []  # the program's or the package's name: no command
    doc.write_text("Run `lclsc cv --lopo` or `python experiments/ablate.py --collect`; see `lclsc_jax.data`.\n")
    assert [a for _, a in inline_commands([doc])] == [["lclsc", "cv", "--lopo"], ["experiments/ablate.py", "--collect"]]


@pytest.mark.parametrize("argv", [["lclsc", "train", "--workdri", "runs/x"],           # a typo in a flag
                                  ["lclsc", "evaluate", "--workdir", "r", "--splits", "test"],
                                  ["lclsc", "trian", "--workdir", "r"],                 # a typo in a subcommand
                                  ["experiments/ablate.py", "--out", "o", "--colect"]])
def test_a_wrong_flag_fails(argv, capsys, monkeypatch):
    with pytest.raises(pytest.fail.Exception, match="does not parse"):
        parse_command(argv, capsys, monkeypatch)
    with pytest.raises(pytest.fail.Exception, match="does not parse"):  # also as a fragment
        parse_command(argv, capsys, monkeypatch, fragment=True)


def test_a_fragment_may_leave_out_required_arguments(capsys, monkeypatch):
    parse_command(["lclsc", "train", "--init-from", "FILE"], capsys, monkeypatch, fragment=True)
    with pytest.raises(pytest.fail.Exception, match="required"):
        parse_command(["lclsc", "train", "--init-from", "FILE"], capsys, monkeypatch)
