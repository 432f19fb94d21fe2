"""Command line: `mpdeploy <stage> ...` (also `python -m mpdeploy`).

Each stage lives in `mpdeploy/commands/<name>.py` with `add_arguments(parser)` and `main(args) -> int`;
heavy imports happen inside `main`, so `mpdeploy --help` stays fast. A `MpdeployError` is printed on one
line (no traceback) with exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from mpdeploy import __version__
from mpdeploy.errors import MpdeployError

COMMANDS = {
    "analyze": "fit the Marchenko-Pastur bulk of every layer; write spectra.json and plots",
    "prune": "prune to N:M with an MP budget; write the pruned/ artifact",
    "export": "export a pruned artifact to ONNX that carries its sparsity, and check it",
    "engine": "build the sparse engine and its dense twin from an onnx/ artifact",
    "build": "prune [-> distill] -> export -> engines (-> audit)",
    "audit": "measure latency and accuracy of the sparse engine against its dense twin",
    "report": "compare several audits side by side",
    "distill": "short recovery: distill the dense teacher into the pruned student, masks frozen",
    "ship": "write a Triton Inference Server model repository entry for an audited engine",
}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The parser; with `only`, just that subcommand's arguments are added (its module imported)."""
    parser = argparse.ArgumentParser(prog="mpdeploy", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"mpdeploy {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, help_text in COMMANDS.items():
        command = sub.add_parser(name, help=help_text, description=help_text)
        if only is None or only == name:
            module = importlib.import_module(f"mpdeploy.commands.{name}")
            module.add_arguments(command)
            command.set_defaults(_main=module.main)
    return parser


def _command_in(argv: list[str]) -> str | None:
    """The subcommand named in argv (the first word that is one), so only its module is imported."""
    for word in argv:
        if word in COMMANDS:
            return word
    return None


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is at emit time (it may be swapped, e.g. by test capture)."""

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def _configure_logging(verbose: int, quiet: bool) -> None:
    """One stderr handler on the `mpdeploy` logger; the root logger (and pytest's capture) stays as is."""
    level = logging.WARNING if quiet else (logging.DEBUG if verbose > 1 else logging.INFO)
    logger = logging.getLogger("mpdeploy")
    for handler in [h for h in logger.handlers if getattr(h, "_mpdeploy_cli", False)]:
        logger.removeHandler(handler)
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    handler._mpdeploy_cli = True  # type: ignore[attr-defined]
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False
    if verbose > 1:  # debug: let third-party loggers through the root logger too
        logging.basicConfig(level=logging.DEBUG, stream=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    whole_process = argv is None  # the console script / `python -m mpdeploy`, not an in-process caller
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(only=_command_in(argv) or "")
    args = parser.parse_args(argv)
    if not getattr(args, "_main", None):
        parser.print_help()
        return 2
    _configure_logging(args.verbose, args.quiet)
    try:
        return int(args._main(args) or 0)
    except MpdeployError as exc:
        print(f"mpdeploy {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"mpdeploy {args.command}: interrupted; no partial artifact was kept", file=sys.stderr)
        if whole_process:
            # The stage has cleaned up (atomic folders) by now. Leave at once: under load, interpreter
            # shutdown after an interrupted export sometimes ended by the signal itself (exit -2, not
            # 130; seen in test_faults_chain), past any handler of ours.
            sys.stdout.flush()
            sys.stderr.flush()
            logging.shutdown()
            os._exit(130)
        return 130
    except OSError as exc:  # a full disk or an over-long path anywhere: one line, not a traceback
        from mpdeploy.artifacts import os_error_message

        message = os_error_message(exc, exc.filename or "the output")
        if message is None:
            raise
        print(f"mpdeploy {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
