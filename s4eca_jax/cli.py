"""What every command line of the project shares: absl flags, `--config=FILE[:arg]` with
`--config.FIELD=VALUE` overrides, `--help` that exits 0, and the exit codes.

    EXIT_OK = 0        done
    EXIT_ERROR = 1     failed (the message says why; --debug shows the traceback)
    EXIT_USAGE = 2     bad flags, config or input: one line naming the fix
    EXIT_STOPPED = 75  stopped on request (SIGTERM, config.stop_after_steps) with a
                       checkpoint: rerun the same command to resume (schedulers requeue)

A command module defines its flags at import, then calls `cli.run(main)` under
`if __name__ == "__main__"`. `main(argv)` raises `UsageError` for anything the user must
fix and `Stopped` to end with EXIT_STOPPED.
"""

from __future__ import annotations

import os
import sys
import threading
import traceback
from typing import Callable

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_STOPPED = 0, 1, 2, 75

FLAGS = flags.FLAGS
_DEBUG = flags.DEFINE_bool("debug", False, "Show the Python traceback of an error.")


class UsageError(Exception):
  """Bad flags, config or input: printed as one line, exit EXIT_USAGE."""


class Stopped(Exception):
  """The run stopped on request with a checkpoint: exit EXIT_STOPPED (rerun to resume)."""


def define_config(required: bool = True) -> flags.FlagHolder:
  """--config=FILE[:arg], a config file loaded by path, fields overridable as
  --config.FIELD=VALUE."""
  holder = config_flags.DEFINE_config_file(
      "config", None, "Config file, e.g. configs/rrsisd.py or configs/rrsisd.py:variant=tiny "
      "(any path, from any directory); override fields with --config.FIELD=VALUE.",
      lock_config=True)
  if required:
    flags.mark_flag_as_required("config")
  return holder


def _one_line(error: BaseException) -> str:
  text = str(error).strip() or type(error).__name__
  if "Traceback (most recent call last)" in text:
    # config_flags embeds the config file's traceback: keep the flag and the last line.
    head = text.split("Traceback (most recent call last)")[0].strip().rstrip(":")
    last = [line for line in text.splitlines() if line.strip()][-1].strip()
    text = f"{head}: {last}" if head else last
  return " ".join(text.split())


def _parse(argv: list[str]) -> list[str]:
  try:
    return FLAGS(argv)
  except flags.Error as error:
    print(f"error: {_one_line(error)} (see --help)", file=sys.stderr)
    sys.exit(EXIT_USAGE)
  except Exception as error:  # pylint: disable=broad-except  # a config file that fails to load
    if "--debug" in argv:
      traceback.print_exc()
    print(f"error: {_one_line(error)}", file=sys.stderr)
    sys.exit(EXIT_USAGE)


def exit_now(code: int) -> None:
  """Ends the process without waiting for other threads: a failed run may leave
  background threads (orbax's savers, grain's readers) that would hold the interpreter
  at shutdown forever. Output is flushed first, so the error stays the last line."""
  for stream in (sys.stdout, sys.stderr):
    try:
      stream.flush()
    except (OSError, ValueError):
      pass
  os._exit(code)  # pylint: disable=protected-access


def _wants_help(argv: list[str]) -> bool:
  return any(arg in ("-h", "--help", "-?", "--helpshort", "--helpfull") for arg in argv[1:])


def run(main: Callable[[list[str]], object], argv: list[str] | None = None) -> None:
  """Runs `main` as a command: help exits 0, usage errors exit 2 with one line, a stop
  request exits 75, any other error exits 1 (traceback only with --debug)."""
  argv = list(sys.argv if argv is None else argv)
  module = sys.modules.get("__main__")
  if _wants_help(argv):
    # absl's own --help exits with status 1; a help request is not an error.
    print((module.__doc__ or "").strip() + "\n")
    print(FLAGS.main_module_help())
    print("\nAlso: --debug shows the traceback of an error; --verbosity=0 shows the "
          "libraries' INFO logs. Exit codes: 0 done, 1 error, "
          f"2 usage error, {EXIT_STOPPED} stopped on request (rerun to resume).")
    sys.exit(EXIT_OK)

  def wrapped(args):
    if not FLAGS["verbosity"].present:
      # Libraries' INFO logs (orbax logs every save in dozens of lines) stay hidden unless
      # asked for with --verbosity=0; warnings and errors still show.
      logging.set_verbosity(logging.WARNING)
    if len(args) > 1 and not getattr(main, "takes_positional", False):
      raise UsageError(f"unexpected arguments {args[1:]}; flags are --name=value")
    try:
      main(args)
    except UsageError as error:
      if _DEBUG.value:
        traceback.print_exc()
      print(f"error: {_one_line(error)}", file=sys.stderr)
      sys.exit(EXIT_USAGE)
    except Stopped as stop:
      print(str(stop), file=sys.stderr)
      sys.exit(EXIT_STOPPED)
    except (KeyboardInterrupt, SystemExit):
      raise
    except Exception as error:  # pylint: disable=broad-except
      # Background threads of the failed run (orbax's savers) may still raise, and their
      # tracebacks would print over the error line: the process ends next, so they go
      # unprinted, and the error starts a line of its own.
      threading.excepthook = lambda args: None
      if _DEBUG.value:
        traceback.print_exc()
      message = (f"error: {type(error).__name__}: {_one_line(error)}"
                 + ("" if _DEBUG.value else " (--debug shows the traceback)"))
      try:
        sys.stderr.flush()
        os.write(sys.stderr.fileno(), f"\n{message}\n".encode())  # one write: not interleaved
      except (AttributeError, OSError, ValueError):  # a stderr without a file descriptor
        print(message, file=sys.stderr)
      exit_now(EXIT_ERROR)

  try:
    app.run(wrapped, argv=argv, flags_parser=_parse)
  except UsageError as error:  # raised before main, e.g. unexpected arguments
    print(f"error: {_one_line(error)}", file=sys.stderr)
    sys.exit(EXIT_USAGE)


def positional(main):
  """Marks a main() that takes positional arguments (e.g. prepare's dataset name)."""
  main.takes_positional = True
  return main
