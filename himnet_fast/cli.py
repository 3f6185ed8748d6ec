"""The ``himnet-fast`` console script (also ``python -m himnet_fast``).

Subcommands: ``info`` (here), ``bench`` and ``scale`` (himnet_fast.benchmark.cli), ``train`` and
``evaluate`` (himnet_fast.training.cli). Each plug-in module exposes ``add_subcommands(subparsers)``
and imports its heavy dependencies only when its subcommand runs.
"""
from __future__ import annotations

import argparse
import importlib
import os
import platform
import signal
import sys

_PLUGINS = ("himnet_fast.benchmark.cli", "himnet_fast.training.cli")


def _info(args) -> int:
    import torch

    import himnet_fast
    from himnet_fast._backend import backend_report

    print(f"himnet_fast {himnet_fast.__version__}")
    print(f"python {platform.python_version()}, torch {torch.__version__}, "
          f"CUDA runtime {torch.version.cuda or 'none'}")
    try:
        import triton
        print(f"triton {triton.__version__}")
    except ImportError:
        print("triton not installed")
    if torch.cuda.is_available():
        print(f"device: {torch.cuda.get_device_name()}")
    else:
        print("device: cpu (no CUDA device)")
    from himnet_fast._cuda_ext_loader import info as cuda_ext_info

    print(f"CUDA extension: {cuda_ext_info()}")
    for name, state in backend_report().items():
        print(f"  backend {name:7s} {state}")
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse with the project's error convention: one line on stderr, exit status 2 (argparse
    itself prints the whole usage first). Subcommand parsers are of the same class."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} ({self.prog} --help lists the options)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="himnet-fast", description=__doc__.splitlines()[0],
                                     epilog="A user error prints one line and exits with status 2; --debug "
                                            "(anywhere on the line) shows its traceback.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, device and which backends can run").set_defaults(func=_info)
    for name in _PLUGINS:
        try:
            mod = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if not name.startswith(exc.name or "?"):
                raise
            continue
        mod.add_subcommands(sub)
    return parser


def _user_errors() -> tuple:
    """Exceptions that mean the user asked for something that cannot be done (a missing file,
    a wrong value, an unavailable device or backend, a missing optional package): reported in
    one line with exit status 2. Anything else is a bug and keeps its traceback."""
    errors = [OSError, ValueError, TypeError, ImportError]
    for mod, name in (("himnet_fast.training.cli", "UserError"), ("himnet_fast._backend", "BackendUnavailableError")):
        try:
            errors.append(getattr(importlib.import_module(mod), name))
        except (ImportError, AttributeError):
            pass
    return tuple(errors)


def _closed_pipe() -> int:
    """Output went to a pipe whose reader has gone (``himnet-fast evaluate ... | head``): end
    quietly with the status of a process killed by SIGPIPE, 128 + 13, as a shell reports it. The
    rest of stdout goes to /dev/null, so flushing it at exit does not fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):  # no file descriptor behind sys.stdout (an in-process caller)
        pass
    return 128 + getattr(signal, "SIGPIPE", 13)


def main(argv=None) -> int:
    try:
        code = _main(argv)
        sys.stdout.flush()  # a closed pipe shows up here for output still in the buffer
        return code
    except BrokenPipeError:
        return _closed_pipe()
    # (argparse's --help and usage messages ignore a closed pipe themselves and exit as usual)


def _main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv  # accepted anywhere on the line, before or after the subcommand
    argv = [a for a in argv if a != "--debug"]
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help (0) or a usage error (2, one line already printed)
        return exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 2
    args.debug = debug
    try:
        return int(args.func(args) or 0)
    except BrokenPipeError:
        raise  # not a user error: handled by main
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"himnet-fast {args.command}: interrupted", file=sys.stderr)
        return 130
    except SystemExit as exc:  # raise SystemExit("message") in a handler: a user error too
        if isinstance(exc.code, str) and not debug:
            print(f"himnet-fast {args.command}: error: {exc.code}", file=sys.stderr)
            return 2
        raise
    except _user_errors() as exc:
        if debug:
            raise
        msg = " ".join(str(exc).split()) or type(exc).__name__
        print(f"himnet-fast {args.command}: error: {msg} (--debug shows the traceback)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
