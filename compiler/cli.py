"""The `ffc` command line: compile, build, calibrate (cli_compile.py), run, serve (cli_run.py),
inspect, debug compare, bench, eval (cli_tools.py).

Arguments are parsed here (cli_args.py); the module of the command given is imported then, not
all of them up front: `ffc run` and `ffc serve` need torch and the runtime only, and start in
about half the time that importing the compiler, transformers, the search and the plotting
libraries for every command took.
"""
from __future__ import annotations

import importlib
import signal
import sys

from .cli_args import build_parser
from .errors import FfcError

MODULES = {"compile": "ffc.cli_compile", "build": "ffc.cli_compile", "calibrate": "ffc.cli_compile",
           "run": "ffc.cli_run", "serve": "ffc.cli_run",
           "inspect": "ffc.cli_tools", "debug": "ffc.cli_tools", "bench": "ffc.cli_tools", "eval": "ffc.cli_tools"}


def _terminated(signum, frame) -> None:
    raise SystemExit(128 + signum)


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    # SIGTERM (kill, a job scheduler, a container stop) unwinds like Ctrl-C: a compile removes its
    # temporary directory, child processes and ranks are stopped (the server drains on its own)
    if args.cmd != "serve":
        signal.signal(signal.SIGTERM, _terminated)
    try:
        handler = importlib.import_module(MODULES[args.cmd]).COMMANDS[args.cmd]
        handler(args)
    except FfcError as e:
        print(f"ffc: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)
    except BrokenPipeError:  # e.g. `ffc inspect ... | head`
        sys.stderr.close()
        sys.exit(0)


if __name__ == "__main__":
    main()
