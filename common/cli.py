"""What every part of the ``fedhead`` command line shares, and ``fedhead weights``.

- exit codes (:class:`ExitCode`) and the one-line-per-problem error report;
- :func:`parse_run_config`: ``--run-config "k=v ..."`` text into values,
  refusing anything it cannot read instead of dropping it, as Flower's own
  parser does (``"lr 0.1"``, ``"lr="`` and ``"=3"`` all give ``{}`` there);
- :func:`check_run_name`: a run name is one plain folder name;
- the ``weights`` command group.
"""

from __future__ import annotations

import enum
import os
import re
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from common.config import is_plain_name
from common.errors import ConfigError, DataError, FedHeadError, FingerprintError, WeightsError

__all__ = [
    "ExitCode",
    "exit_code_for_error",
    "report_problem",
    "stdout_console",
    "parse_run_config",
    "check_run_name",
    "weights_app",
]


class ExitCode(enum.IntEnum):
    """``fedhead``'s exit codes."""

    OK = 0  # finished
    FAILED = 1  # the run (or the work) failed
    BAD_INPUT = 2  # bad arguments, config, data or weights: nothing was started
    DEGRADED = 3  # finished, but a site failed or was rejected in some round
    INTERRUPTED = 130  # stopped by SIGINT or SIGTERM


_BAD_INPUT = (ConfigError, DataError, WeightsError, FingerprintError)


def exit_code_for_error(exc: FedHeadError) -> ExitCode:
    """BAD_INPUT for what the user can fix before starting; else the error's ``exit_code``, or FAILED."""
    code = getattr(exc, "exit_code", None)
    if code is not None:
        return ExitCode(code)
    return ExitCode.BAD_INPUT if isinstance(exc, _BAD_INPUT) else ExitCode.FAILED


def report_problem(message: str | BaseException) -> None:
    """Print ``message`` to stderr, each of its lines as one ``fedhead: ...`` line."""
    for line in str(message).splitlines() or [""]:
        if line.strip():
            print(f"fedhead: {line.strip()}", file=sys.stderr, flush=True)


def stdout_console() -> Console:
    """A rich console on stdout; 120 columns wide when stdout is no terminal (logs, pipes)."""
    wide = not sys.stdout.isatty() and "COLUMNS" not in os.environ
    return Console(width=120 if wide else None, soft_wrap=False, highlight=False)


_KEY = re.compile(r"[a-z][a-z0-9]*(?:-[a-z0-9]+)*")
_WORD = re.compile(r"""(?:[^\s'"]|'[^']*'|"[^"]*")+""")
_VALUE = re.compile(r"""'[^']*'|"[^"]*"|[^\s'"]+""")
_HOW = "write each setting as key=value, separated by spaces, text in quotes: \"lr=0.01 strategy='fedprox'\""


def _words(text: str) -> tuple[list[str], list[str]]:
    """Shell-like words of ``text`` (quotes kept, so that Flower can tell text from numbers), or a problem."""
    words, position = [], 0
    for match in _WORD.finditer(text):
        if text[position : match.start()].strip():
            break
        words.append(match.group())
        position = match.end()
    rest = text[position:].strip()
    if rest:  # only an unmatched quote stops the words before the end
        return [], [f"unterminated {rest[0]} quote at {rest!r}"]
    return words, []


def parse_run_config(text: str) -> dict[str, Any]:
    """``"k=v k2='text'"`` -> ``{"k": v, "k2": "text"}``; ConfigError quoting every part it cannot read.

    Words are split like a shell's (quoted text may hold spaces); each must be
    ``key=value`` with a kebab-case key, given once; the value is then parsed
    by Flower's own ``parse_config_args`` (TOML: ``3`` is an int, ``0.1`` a
    float, ``true`` a bool, quoted text a string).
    """
    words, problems = _words(text)
    if words:
        from click import ClickException
        from flwr.common.config import parse_config_args
    values: dict[str, Any] = {}
    for word in words:
        key, sep, value = word.partition("=")
        if not sep:
            problems.append(f"{word!r} is not key=value")
        elif not key:
            problems.append(f"{word!r} has no key before '='")
        elif not _KEY.fullmatch(key):
            problems.append(f"{word!r}: the key {key!r} is not a kebab-case name like 'local-epochs'")
        elif not value:
            problems.append(f"{word!r} has no value after '='")
        elif not _VALUE.fullmatch(value):
            problems.append(f"{word!r}: quote the whole value, as in {key}='text'")
        elif key in values:
            problems.append(f"{word!r}: '{key}' is given twice")
        else:
            try:  # a trailing space keeps Flower from reading a value ending in .toml as a file name
                parsed = parse_config_args([word + " "])
            except ClickException:
                problems.append(f"{word!r}: {value!r} is not a number, true/false or quoted text; write {key}='{value}'")
                continue
            values[key] = parsed[key]
    if problems:
        raise ConfigError(f"cannot parse --run-config {text!r}:\n  - " + "\n  - ".join(problems) + f"\n{_HOW}")
    return values


def check_run_name(name: str, what: str = "--name") -> str:
    """``name`` if it is one plain folder name; else a ConfigError saying what a name may hold."""
    if not is_plain_name(name):
        raise ConfigError(
            f"{what} {name!r} is not a plain name: use letters, digits, '.', '_' and '-' "
            "(at most 128), not starting with '.', with no '/', '\\' or '..'"
        )
    return name


weights_app = typer.Typer(name="weights", help="Provision backbone weights (for air-gapped sites too).", no_args_is_help=True)


@weights_app.command("stage")
def stage(
    file: Annotated[Path, typer.Argument(help="A torchvision release file, e.g. mobilenet_v2-b0353104.pth.")],
    backbone: Annotated[str | None, typer.Option(help="Backbone name (default: from the file name).")] = None,
) -> None:
    """Check a weights file's sha256 and put it where torchvision's weights API looks (torch's hub cache).

    FILE is a torchvision release file, e.g. mobilenet_v2-b0353104.pth.
    """
    from common.hashing import sha256_file
    from common.weights import stage_weights_file

    try:
        dest = stage_weights_file(file, backbone=backbone)
    except OSError as exc:  # an unreadable file, a hub cache this user cannot write
        report_problem(f"cannot stage {file}: {exc.strerror or exc}: {exc.filename or file}; "
                       "check the file's permissions, or set TORCH_HOME to a folder this user can write")
        raise typer.Exit(ExitCode.BAD_INPUT) from None
    print(f"staged {file.name} at {dest} (sha256 {sha256_file(dest)})")
