"""`certfleet` run as a real process (the console entry point), and process checks."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

CERTFLEET = [sys.executable, "-m", "certfleet.cli"]

Completed = subprocess.CompletedProcess[str]


def certfleet_up(
    data_dir: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.Popen[str]:
    """`certfleet up --data-dir DATA_DIR ARGS...` started, stdout and stderr merged.

    SIGINT is restored to its default in the child: a test run started in the background
    by a shell inherits SIGINT ignored, and the tests stop `up` with SIGINT (Ctrl-C)."""
    return subprocess.Popen(
        [*CERTFLEET, "up", "--data-dir", str(data_dir), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, **(env or {})},
        preexec_fn=_default_sigint,  # noqa: PLW1509 - only a signal disposition, no locks
    )


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def alive(pid: int) -> bool:
    """Whether a process ``pid`` exists (signal 0)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def run_certfleet(
    args: Sequence[str], *, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """The real console entry point in a subprocess (one-line errors, exit codes)."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [*CERTFLEET, *args], capture_output=True, text=True, env=full_env, timeout=timeout
    )


def certfleet_in_process(
    *args: str, env: dict[str, str] | None = None, unset_prefix: str | None = None
) -> Completed:
    """`certfleet ARGS` run through its ``main()`` in this process: the same one-line errors
    and exit codes as the console script, without a Python start-up (about 0.7 s) per run.

    ``unset_prefix`` (e.g. ``"CERTFLEET_"``) removes the variables so named before ``env`` is
    applied: a clean environment, as a subprocess given a filtered ``env`` would see.
    stdout and stderr are captured; ``os.environ`` (the CLI writes its flags there), the root
    logger and every logger's level (the CLI configures them), ``sys.argv`` and the CLI's
    registered command groups are restored afterwards. For tests that check only output and
    exit code; a few keep running through the real entry point (tests/certfleet/test_cli.py,
    tests/certfleet/test_operations.py, :func:`run_certfleet`)."""
    from certfleet import cli
    from device_sim.cli import app as sim_app

    saved_env, saved_argv = dict(os.environ), sys.argv
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    saved_levels = {
        name: logger.level
        for name, logger in logging.Logger.manager.loggerDict.items()
        if isinstance(logger, logging.Logger)
    }
    saved_groups = (list(cli.app.registered_groups), list(cli.app.registered_commands))
    saved_sim = list(sim_app.registered_commands)
    stdout, stderr = io.StringIO(), io.StringIO()
    code = 0
    try:
        if unset_prefix is not None:
            for name in [name for name in os.environ if name.startswith(unset_prefix)]:
                del os.environ[name]
        os.environ.update(env or {})
        sys.argv = ["certfleet", *args]
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            try:
                cli.main()
            except SystemExit as exc:
                if isinstance(exc.code, str):  # as the interpreter does: the text, exit 1
                    print(exc.code, file=sys.stderr)
                code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        os.environ.clear()
        os.environ.update(saved_env)
        sys.argv = saved_argv
        root.handlers[:] = saved_handlers
        root.setLevel(saved_level)
        for name, logger in list(logging.Logger.manager.loggerDict.items()):
            if isinstance(logger, logging.Logger):  # one made during the run: as it was made
                logger.setLevel(saved_levels.get(name, logging.NOTSET))
        cli.app.registered_groups[:], cli.app.registered_commands[:] = saved_groups
        sim_app.registered_commands[:] = saved_sim
    return subprocess.CompletedProcess(
        ["certfleet", *args], code, stdout.getvalue(), stderr.getvalue()
    )
