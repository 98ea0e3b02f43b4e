"""The `leadscore` console script: takes note of a stop asked for while the CLI is still starting.

Importing the CLI takes seconds (FastAPI, SQLAlchemy, scikit-learn...), and until a process has a
handler, SIGTERM kills it with the default action. A `leadscore worker` stopped right after it was
started (a rolling deploy, a scale-down) would then die with -15 instead of ending cleanly with 0.
So this module imports only the standard library and installs a handler that just remembers the
request, before anything heavy is imported. `leadscore worker` honours the request once its event
loop handles the signals (`stop_requested`); every other command gets Python's default handling
back, and with it the fate a signal meant for it before (`release`): a `leadscore migrate` stopped
while starting must not exit 0 as if it had migrated.
"""

from __future__ import annotations

import signal
from types import FrameType

_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_requested: int | None = None


def _note(signum: int, _frame: FrameType | None) -> None:
    global _requested
    if _requested is None:
        _requested = signum


def stop_requested() -> bool:
    """Whether SIGTERM or SIGINT arrived since the process started (always False in-process, e.g.
    under click's test runner, where `main` did not run)."""
    return _requested is not None


def release() -> None:
    """Python's default handlers again, then the signal noted meanwhile (if any) as if it arrived now.
    Does nothing unless `main` installed the handlers."""
    if signal.getsignal(signal.SIGTERM) is not _note:
        return
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if _requested is not None:
        signal.raise_signal(_requested)


def main() -> None:
    for sig in _STOP_SIGNALS:
        signal.signal(sig, _note)
    from service.cli import main as cli

    cli()
