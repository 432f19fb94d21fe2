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
import signal
import sys

from mpdeploy import __version__
from mpdeploy.core.errors import MpdeployError
from mpdeploy.core.trust import granted_by

COMMANDS = {
    "analyze": "fit the Marchenko-Pastur bulk of every layer; write its spectra and plots",
    "prune": "prune to N:M with an MP budget; write the pruned/ artifact",
    "export": "export a pruned artifact to ONNX that carries its sparsity, and check it",
    "engine": "build the sparse engine and its dense twin from an onnx/ artifact",
    "build": "prune [-> distill] -> export -> engines (-> audit)",
    "audit": "measure latency and accuracy of the sparse engine against its dense twin",
    "report": "compare several audits side by side",
    "distill": "short recovery: distill the dense teacher into the pruned student, masks frozen",
    "densify": "give the layers an engine ran dense their dense weights back (a new pruned artifact)",
    "ship": "write a Triton Inference Server model repository entry for an audited engine",
    "sweep": "run many build chains on Ray; the fastest engine within an accuracy budget, and the frontier",
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
    """Run one command line. Without `argv` (the console script, `python -m mpdeploy`) this call is the
    whole process and also owns Ctrl-C (see `_whole_process`); with `argv` it only runs the command."""
    if argv is None:
        return _whole_process(sys.argv[1:])
    return _run(list(argv))


def _run(argv: list[str]) -> int:
    parser = build_parser(only=_command_in(argv) or "")
    args = parser.parse_args(argv)
    if not getattr(args, "_main", None):
        parser.print_help()
        return 2
    _configure_logging(args.verbose, args.quiet)
    try:
        with granted_by(args):  # code from model files / manifests runs only if this command line says so
            return int(args._main(args) or 0)
    except MpdeployError as exc:
        print(f"mpdeploy {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        _say_interrupted(args.command)
        return INTERRUPTED
    except OSError as exc:  # a full disk or an over-long path anywhere: one line, not a traceback
        from mpdeploy.core.atomic import os_error_message

        message = os_error_message(exc, exc.filename or "the output")
        if message is None:
            raise
        print(f"mpdeploy {args.command}: error: {message}", file=sys.stderr)
        return 2


INTERRUPTED = 130  # 128 + SIGINT: what a shell reports for a command stopped by Ctrl-C


def _say_interrupted(command: str | None) -> None:
    name = f"mpdeploy {command}" if command else "mpdeploy"
    print(f"{name}: interrupted; no partial artifact was kept", file=sys.stderr)


class _CtrlC:
    """The process's SIGINT handler: the first Ctrl-C raises KeyboardInterrupt, later ones are ignored
    while the stage removes its temporary folder and the process leaves."""

    def __init__(self) -> None:
        self.received = False

    def __call__(self, signum, frame) -> None:
        self.received = True
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        raise KeyboardInterrupt


def _whole_process(argv: list[str]) -> int:
    """The command line as a process: Ctrl-C anywhere from here on ends it with exit 130 and one line.

    Why this is needed (issue 23; tests/test_faults_chain.py shows each case): Python raises
    KeyboardInterrupt wherever the main thread happens to be. Raised outside the stage's `try`
    (argument parsing, the command module's import, the return into sys.exit) it reached the
    interpreter, which then kills its own process with SIGINT: exit -2 and no line. And a Ctrl-C after
    the stage had finished, during interpreter teardown, found SIGINT back at its default action
    (Python restores it while finalizing) and killed the process outright: -2 again. So the handler is
    installed first, everything runs inside one `try`, and SIGINT is ignored from the moment the stage
    has returned (an ignored signal stays ignored through teardown).
    """
    ctrl_c = _CtrlC()
    signal.signal(signal.SIGINT, ctrl_c)
    try:
        try:
            code = _run(argv)
        finally:
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # the work is done (or given up): nothing to stop
    except KeyboardInterrupt:  # it landed outside the stage (parsing, imports): nothing was written yet
        _say_interrupted(_command_in(argv))
        code = INTERRUPTED
    if ctrl_c.received and code == INTERRUPTED:
        # The stage has cleaned up (atomic folders); leave at once rather than wait on library teardown.
        sys.stdout.flush()
        sys.stderr.flush()
        logging.shutdown()
        os._exit(INTERRUPTED)
    return code


if __name__ == "__main__":
    sys.exit(main())
