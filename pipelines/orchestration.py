"""How a command runs its flow: on a Prefect API, or in-process without one.

- `PREFECT_API_URL` set: every command runs its flow on that server (flow and task runs, with
  Prefect's retries, show in its UI).
- Not set: single commands (`train`, `score`, `validate`, `promote`, `rollback`, `stage`) run
  the same composition (`stages.py`) in-process with the same stages and the same retry rule
  (tenacity, each stage's own retries and delays), with no server and without importing Prefect. `vaeflow run` (and Dask scoring, whose task
  runner needs an API) start Prefect's own API app in a child process of the command: it waits
  for the server as long as `PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS` (180 s here,
  Prefect's default of 20 s failed on a busy machine), and on Linux the child is sent SIGTERM
  when the command dies, even by SIGKILL, so no server outlives it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from pipelines.errors import ConfigError, TransientError, VaeflowError, is_transient

log = logging.getLogger(__name__)

STARTUP_TIMEOUT_ENV = "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"
DEFAULT_STARTUP_TIMEOUT_S = 180


def has_api() -> bool:
    """Whether a Prefect server is configured for this process: PREFECT_API_URL in the
    environment or in the active Prefect profile (Prefect's settings are read only when a
    profiles file exists, so a command without one does not pay for importing Prefect)."""
    if os.environ.get("PREFECT_API_URL"):
        return True
    home = Path(os.environ.get("PREFECT_HOME") or Path.home() / ".prefect")
    profiles = Path(os.environ.get("PREFECT_PROFILES_PATH") or home / "profiles.toml")
    if not (profiles.is_file() and "PREFECT_API_URL" in profiles.read_text(errors="replace")):
        return False
    from prefect.settings import PREFECT_API_URL

    return bool(PREFECT_API_URL.value())


def retrying(fn: Callable, retries: int, delays: Any, name: str) -> Callable:
    """`fn` retried `retries` times on `TransientError`s, waiting `delays` seconds (a number or
    one per retry) between tries."""
    import tenacity

    waits = list(delays) if isinstance(delays, list | tuple) else [delays or 0] * max(retries, 1)
    waits = waits or [0]

    def before_sleep(state: tenacity.RetryCallState) -> None:
        log.warning(
            "%s failed (%s); retry %d/%d in %ss",
            name,
            state.outcome.exception() if state.outcome else "?",
            state.attempt_number,
            retries,
            waits[min(state.attempt_number - 1, len(waits) - 1)],
        )

    return tenacity.retry(
        retry=tenacity.retry_if_exception(is_transient),
        stop=tenacity.stop_after_attempt(retries + 1),
        wait=tenacity.wait_chain(*[tenacity.wait_fixed(w) for w in waits]),
        before_sleep=before_sleep,
        reraise=True,
    )(fn)


@contextlib.contextmanager
def prefect_api(needed: bool) -> Iterator[bool]:
    """Yield whether the command's flow should run on Prefect: True with a configured server,
    or (when `needed`) with a temporary server started here for the command; False otherwise."""
    if has_api():
        yield True
    elif needed:
        with temporary_server():
            yield True
    else:
        yield False


class _QuietConsole(logging.Filter):
    """On the terminal, Prefect's records of a failure the command reports itself are left out
    (an expected error's traceback, "Finished in state Failed"), and other failures lose their
    traceback (it goes to a file); the Prefect API (the UI) still gets every record whole."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith("prefect"):
            return True
        if str(record.msg).startswith("Finished in state Failed"):
            return False
        if record.exc_info:
            if isinstance(record.exc_info[1], VaeflowError):
                return False
            record.exc_info, record.exc_text = None, None
        return True


def quiet_console(debug: bool = False) -> None:
    """Install `_QuietConsole` on every handler that writes to the terminal: the root logger's
    and Prefect's console handlers (not with `--debug`)."""
    if debug:
        return
    from prefect.logging.handlers import APILogHandler

    loggers = [logging.getLogger()]
    loggers += [
        lg
        for name, lg in logging.Logger.manager.loggerDict.items()
        if isinstance(lg, logging.Logger) and name.startswith("prefect")
    ]
    for logger in loggers:
        for handler in logger.handlers:
            terminal = isinstance(handler, logging.StreamHandler) and not isinstance(
                handler, logging.FileHandler
            )
            if (
                terminal
                and not isinstance(handler, APILogHandler)
                and not any(isinstance(f, _QuietConsole) for f in handler.filters)
            ):
                handler.addFilter(_QuietConsole())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent(parent: int) -> Callable[[], None]:
    """preexec_fn: ask Linux to send SIGTERM to the child when the parent dies (PR_SET_PDEATHSIG)."""

    def setup() -> None:
        with contextlib.suppress(Exception):
            import ctypes

            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the parent died before the request took effect
            os._exit(1)

    return setup


def startup_timeout() -> float:
    return float(os.environ.get(STARTUP_TIMEOUT_ENV) or DEFAULT_STARTUP_TIMEOUT_S)


@contextlib.contextmanager
def temporary_server(timeout: float | None = None) -> Iterator[str]:
    """Prefect's API app (the one `prefect server start` and Prefect's ephemeral mode run) in a
    child process of this one, on a free port, for the length of the block; yields its API URL."""
    import prefect
    from prefect.settings import PREFECT_API_URL, temporary_settings

    timeout = startup_timeout() if timeout is None else timeout
    port = _free_port()
    url = f"http://127.0.0.1:{port}/api"
    env = {
        **os.environ,
        "PREFECT_UI_ENABLED": "0",
        "PREFECT__SERVER_EPHEMERAL": "1",
        "PREFECT__SERVER_FINAL": "1",
    }
    args = [
        sys.executable, "-m", "uvicorn", "--app-dir", str(Path(prefect.__file__).parent.parent),
        "--factory", "prefect.server.api.server:create_app", "--host", "127.0.0.1", "--port", str(port),
        "--log-level", "error", "--lifespan", "on",
    ]  # fmt: skip
    preexec = _die_with_parent(os.getpid()) if sys.platform.startswith("linux") else None
    with tempfile.TemporaryDirectory(prefix="vaeflow-prefect-") as tmp:
        logfile = Path(tmp) / "server.log"
        with logfile.open("w") as out:
            proc = subprocess.Popen(args, env=env, stdout=out, stderr=subprocess.STDOUT, preexec_fn=preexec)
        try:
            _wait_healthy(url, proc, timeout, logfile)
            log.info("temporary Prefect server on %s (stops with this command)", url)
            with temporary_settings(updates={PREFECT_API_URL: url}):
                os.environ["PREFECT_API_URL"] = url  # for child processes (Dask workers)
                try:
                    yield url
                finally:
                    _drain_to(url)
                    os.environ.pop("PREFECT_API_URL", None)
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _drain_to(url: str) -> None:
    """Send Prefect's queued logs and events to the server before it stops: left for exit,
    they are retried against the stopped server with backoff for about a minute."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for worker in (APILogWorker, EventsWorker):
        try:
            worker.drain_all(timeout=10)
        except Exception as exc:  # a log that cannot be sent must not fail the command
            log.debug("could not send Prefect's queued %s to %s: %s", worker.__name__, url, exc)


def _wait_healthy(url: str, proc: subprocess.Popen, timeout: float, logfile: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise TransientError(
                f"the temporary Prefect server exited with code {proc.returncode} before answering: "
                f"{_tail(logfile)}; set PREFECT_API_URL to a running server (prefect server start)"
            )
        with contextlib.suppress(OSError), urllib.request.urlopen(f"{url}/health", timeout=2) as resp:
            if resp.status == 200:
                return
        time.sleep(0.2)
    raise TransientError(
        f"the temporary Prefect server did not answer within {timeout:.0f}s (a busy machine?); raise "
        f"{STARTUP_TIMEOUT_ENV}, or set PREFECT_API_URL to a running server (prefect server start)"
    )


def _tail(path: Path, lines: int = 5) -> str:
    with contextlib.suppress(OSError):
        return " | ".join(path.read_text(errors="replace").strip().splitlines()[-lines:])
    return "(no output)"


def ensure_process_pool(name: str) -> None:
    """Create the Prefect work pool `name` (type process, Prefect's default job template) when
    it does not exist; an existing pool of another type is an error."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound
    from prefect.workers.process import ProcessWorker

    with get_client(sync_client=True) as client:
        try:
            pool = client.read_work_pool(name)
        except ObjectNotFound:
            template = ProcessWorker.get_default_base_job_template()
            client.create_work_pool(WorkPoolCreate(name=name, type="process", base_job_template=template))
            log.info("created process work pool %s", name)
            return
    if pool.type != "process":
        raise ConfigError(f"work pool {name!r} is of type {pool.type!r}; vaeflow deploy needs a process pool")
