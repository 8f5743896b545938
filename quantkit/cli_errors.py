"""How the CLI fails: one line on stderr and a documented exit code, never a traceback.

2: bad input (:class:`QuantkitError`); 1: a fault of the machine (full disk, no permission, no memory);
130: Ctrl-C; 143: SIGTERM. Output is atomic, so none of these leaves a partial output.
"""

from __future__ import annotations

import functools
import signal
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import typer

from quantkit.cli_output import err_console
from quantkit.errors import EXIT_ENVIRONMENT_FAULT, EXIT_INTERRUPTED, EXIT_TERMINATED, QuantkitError

F = TypeVar("F", bound=Callable[..., Any])


def user_errors(command: F) -> F:
    """Turn expected failures into ``error: <one line>`` and a documented exit code, never a traceback.

    2: bad input (:class:`QuantkitError`); 1: a fault of the machine (full disk, no permission, no
    memory); 130: Ctrl-C; 143: SIGTERM. Output is atomic, so none of these leaves a partial output.
    """

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        in_main_thread = threading.current_thread() is threading.main_thread()  # signal handlers live there only
        previous = signal.signal(signal.SIGTERM, _raise_terminated) if in_main_thread else None
        try:
            return command(*args, **kwargs)
        except QuantkitError as exc:
            _print_error(str(exc))
            raise typer.Exit(exc.exit_code) from None
        except OSError as exc:
            where = f" ({exc.filename})" if exc.filename else ""
            _print_error(f"{exc.strerror or exc}{where}")
            raise typer.Exit(EXIT_ENVIRONMENT_FAULT) from None
        except MemoryError:
            _print_error("out of memory; free memory or use a machine with more (see docs/user-guide.md, memory use)")
            raise typer.Exit(EXIT_ENVIRONMENT_FAULT) from None
        except Terminated:
            err_console.print("terminated; no partial output was left", highlight=False)
            raise typer.Exit(EXIT_TERMINATED) from None
        except KeyboardInterrupt:
            err_console.print("interrupted; no partial output was left", highlight=False)
            raise typer.Exit(EXIT_INTERRUPTED) from None
        finally:
            if in_main_thread:
                signal.signal(signal.SIGTERM, previous)

    return wrapper  # type: ignore[return-value]


class Terminated(BaseException):
    """SIGTERM, raised where the program stands so that atomic outputs clean up as for Ctrl-C."""


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated


def _print_error(message: str) -> None:
    err_console.print(f"[bold red]error:[/] {' '.join(message.split())}", highlight=False, soft_wrap=True)
