"""Run a command (the test suite) with a PostgreSQL server for the tests marked `postgres`.

    python tests/pg_server.py COMMAND [ARGS...]

- `VAEFLOW_TEST_PG` set, or the command deselects the tests (`-m "not postgres"`): runs it as is.
- A server answers on 127.0.0.1:5432 (`VAEFLOW_TEST_PG_PROBE=host:port` to look elsewhere): runs
  the command against it (`VAEFLOW_TEST_PG=postgresql://postgres@host:port/test`).
- Else, when PostgreSQL's binaries are installed (`initdb` and `pg_ctl` on PATH or in
  /usr/lib/postgresql/*/bin): a throwaway server in a temporary folder (trust authentication,
  user `postgres`, databases `postgres` and `test`, on a free port of 127.0.0.1, its socket in
  that folder; as root, it runs as the `postgres` user, or `nobody`). The command gets
  `VAEFLOW_TEST_PG` and `VAEFLOW_TEST_PG_DIR` (the folder); when it ends, however it ends, the
  server is stopped and the folder removed.
- Else: says how to get a server, or how to skip those tests, and exits 2 without running it.

Exits with the command's exit status (128 + N when a signal N ended it).
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

DEFAULT_PROBE = "127.0.0.1:5432"
BIN_GLOBS = ["/usr/lib/postgresql/*/bin", "/usr/pgsql-*/bin", "/usr/local/pgsql/bin"]

NO_SERVER = """\
The tests marked `postgres` need a PostgreSQL server, and none answers on {probe}.
Any of these:
  - install PostgreSQL (Debian/Ubuntu: `sudo apt install postgresql`); `make test` then starts a
    throwaway server in a temporary folder for the tests (initdb and pg_ctl are all it uses);
  - point the tests at a server that trusts user `postgres` and has a database `test`:
    `make test VAEFLOW_TEST_PG=postgresql://postgres@HOST:PORT/test`;
  - skip those tests: `make test PYTEST_ARGS='-m "not postgres"'`."""


def _say(message: str) -> None:
    print(f"pg_server: {message}", file=sys.stderr, flush=True)


def find_bindir() -> Path | None:
    """The folder holding initdb and pg_ctl: PATH first, then the usual packaged places."""
    initdb = shutil.which("initdb")
    if initdb and shutil.which("pg_ctl"):
        return Path(initdb).resolve().parent
    candidates = [Path(d) for pattern in BIN_GLOBS for d in glob.glob(pattern)]

    def version(d: Path) -> tuple:
        return tuple(int(p) for p in "".join(c if c.isdigit() else " " for c in str(d)).split())

    for d in sorted(candidates, key=version, reverse=True):
        if (d / "initdb").is_file() and (d / "pg_ctl").is_file():
            return d
    return None


def answers(host: str, port: int) -> bool:
    """Is a PostgreSQL server accepting connections there? (`pg_isready` if installed, else TCP.)"""
    bindir = find_bindir()
    pg_isready = shutil.which("pg_isready") or (bindir and shutil.which("pg_isready", path=str(bindir)))
    if pg_isready:
        ready = subprocess.run([pg_isready, "-q", "-h", host, "-p", str(port), "-t", "3"])
        return ready.returncode == 0
    try:
        with socket.create_connection((host, port), timeout=3):
            return True
    except OSError:
        return False


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _server_user() -> pwd.struct_passwd | None:
    """initdb and postgres refuse to run as root: as root, run them as `postgres` (or `nobody`)."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            return pwd.getpwnam(name)
        except KeyError:
            pass
    raise SystemExit(
        "pg_server: running as root and there is no `postgres` or `nobody` user to run PostgreSQL as"
    )


@contextmanager
def throwaway_server(bindir: Path):
    """A fresh PostgreSQL cluster; yields (url, folder). Stopped and removed on the way out."""
    user = _server_user()
    as_user = {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []} if user else {}
    folder = Path(tempfile.mkdtemp(prefix="vaeflow-pg-"))
    data, log = folder / "data", folder / "server.log"
    if user:
        os.chown(folder, user.pw_uid, user.pw_gid)

    def run(*args: str) -> None:
        done = subprocess.run(args, capture_output=True, text=True, cwd=folder, **as_user)
        if done.returncode != 0:
            tail = log.read_text()[-3000:] if log.exists() else ""
            raise RuntimeError(
                f"{' '.join(args)} failed ({done.returncode}):\n{done.stdout}{done.stderr}{tail}"
            )

    try:
        initdb = [str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust"]
        run(*initdb, "-E", "UTF8", "--no-locale")
        for attempt in range(3):  # a free port can be taken between choosing and binding it
            port = _free_port()
            settings = {
                "listen_addresses": "'127.0.0.1'",
                "port": str(port),
                "unix_socket_directories": f"'{folder}'",
                "fsync": "off",  # a throwaway: no crash safety needed
                "synchronous_commit": "off",
                "full_page_writes": "off",
            }
            with (data / "postgresql.auto.conf").open("a") as conf:
                conf.writelines(f"{k} = {v}\n" for k, v in settings.items())
            try:
                run(str(bindir / "pg_ctl"), "-D", str(data), "-l", str(log), "-w", "-t", "60", "start")
                break
            except RuntimeError:
                if attempt == 2:
                    raise
        run(str(bindir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "test")
        _say(f"throwaway PostgreSQL {port=} in {folder}")
        yield f"postgresql://postgres@127.0.0.1:{port}/test", folder
    finally:
        _stop(bindir, data, as_user)
        shutil.rmtree(folder, ignore_errors=True)


def _stop(bindir: Path, data: Path, as_user: dict) -> None:
    pidfile = data / "postmaster.pid"
    if not pidfile.exists():
        return
    for mode in ("fast", "immediate"):
        stop = [str(bindir / "pg_ctl"), "-D", str(data), "-m", mode, "-w", "-t", "30", "stop"]
        if subprocess.run(stop, capture_output=True, **as_user).returncode == 0:
            return
    try:  # pg_ctl could not stop it: kill the postmaster (first line of its pid file)
        os.kill(int(pidfile.read_text().split()[0]), signal.SIGKILL)
        time.sleep(1)
    except (OSError, ValueError, IndexError):
        pass


def run_command(cmd: list[str], env: dict[str, str]) -> int:
    """Run cmd in the foreground; SIGTERM/SIGHUP are passed on; Ctrl-C reaches it from the terminal."""
    proc = subprocess.Popen(cmd, env=env)
    forward = lambda signum, _frame: proc.send_signal(signum)  # noqa: E731
    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGHUP)}
    previous[signal.SIGINT] = signal.signal(signal.SIGINT, lambda *_: None)
    try:
        code = proc.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    return 128 - code if code < 0 else code


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    env = dict(os.environ)
    if env.get("VAEFLOW_TEST_PG") or any("not postgres" in arg for arg in argv):
        os.execvp(argv[0], argv)
    probe = env.get("VAEFLOW_TEST_PG_PROBE") or DEFAULT_PROBE
    host, _, port = probe.rpartition(":")
    if answers(host, int(port)):
        env["VAEFLOW_TEST_PG"] = f"postgresql://postgres@{host}:{port}/test"
        os.execvpe(argv[0], argv, env)
    bindir = find_bindir()
    if bindir is None:
        print(NO_SERVER.format(probe=probe), file=sys.stderr)
        return 2
    _say(f"no PostgreSQL answers on {probe}; starting a throwaway one with {bindir}")
    for s in (signal.SIGTERM, signal.SIGHUP):  # stopped while starting it: still clean up
        signal.signal(s, lambda signum, _frame: sys.exit(128 + signum))
    try:
        with throwaway_server(bindir) as (url, folder):
            env["VAEFLOW_TEST_PG"], env["VAEFLOW_TEST_PG_DIR"] = url, str(folder)
            return run_command(argv, env)
    except RuntimeError as e:  # raised only while starting it: the command has not run
        _say(f"could not start a throwaway PostgreSQL (the tests did not run): {e}")
        if os.geteuid() == 0:
            _say("as root it runs as another user, who must be able to reach $TMPDIR (default /tmp)")
        return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
