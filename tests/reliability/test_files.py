"""Outputs, snapshots and suites get the permissions the umask says; a killed writer's temp
file is removed by the next write.

Before (issue 12): outputs, snapshots and suites were created 0600/0700 whatever the umask (a
private temp file renamed into place); a killed Parquet write left its `.tmp` file forever.
"""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from pipelines import ingest, validation
from pipelines.config import load_settings
from pipelines.warehouse import parse_ref, write_table


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture(params=[0o022, 0o027])
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def test_outputs_snapshots_and_suites_follow_the_umask(project, flights, tmp_path, umask):
    settings = load_settings(project)
    for name in ("out.parquet", "out.csv"):
        write_table(parse_ref(str(tmp_path / name), settings.warehouse_url), [flights.head(10)])
        assert _mode(tmp_path / name) == 0o666 & ~umask
    snap = ingest.take_snapshot(settings, "flights_small", "rownames")
    assert _mode(snap.path) == 0o777 & ~umask
    assert {_mode(p) for p in snap.path.iterdir()} == {0o666 & ~umask}
    suite = validation.save_suite({"name": "s", "expectations": []}, tmp_path / "gx" / "s.json")
    assert _mode(suite) == 0o666 & ~umask


def test_a_replaced_output_keeps_its_own_mode(project, flights, tmp_path):
    settings = load_settings(project)
    ref = parse_ref(str(tmp_path / "shared.parquet"), settings.warehouse_url)
    write_table(ref, [flights.head(5)])
    os.chmod(tmp_path / "shared.parquet", 0o640)
    write_table(ref, [flights.head(7)])
    assert _mode(tmp_path / "shared.parquet") == 0o640


KILLED_WRITER = """
import sys, time
import pandas as pd
from pipelines.warehouse import parse_ref, write_table

def frames():
    for i in range(1000):
        yield pd.DataFrame({"id": range(i * 100, i * 100 + 100), "x": 0.5})
        print("chunk", flush=True)
        time.sleep(0.05)

write_table(parse_ref(sys.argv[1], "duckdb:///unused"), frames())
"""


@pytest.mark.parametrize("name", ["out.parquet", "out.csv"])
def test_a_killed_writers_temp_file_is_removed_by_the_next_write(tmp_path, name):
    target = tmp_path / name
    write_table(parse_ref(str(target), "duckdb:///unused"), [pd.DataFrame({"id": [1], "x": [0.5]})])
    before = target.read_bytes()
    proc = subprocess.Popen(
        [sys.executable, "-c", KILLED_WRITER, str(target)], stdout=subprocess.PIPE, text=True,
        cwd=Path(__file__).resolve().parents[2],
    )  # fmt: skip
    for _ in range(3):
        proc.stdout.readline()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    leftovers = [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert leftovers, "the killed writer left no temp file: the test proves nothing"
    assert target.read_bytes() == before  # the killed write did not touch the output
    write_table(parse_ref(str(target), "duckdb:///unused"), [pd.DataFrame({"id": [2], "x": [1.5]})])
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]


def test_a_snapshot_swap_killed_between_its_renames_is_recovered(tmp_path):
    """The old folder is renamed aside, then the new one into place: killed in between, only the
    old one exists; the next writer puts it back before anything else, so a write that then
    fails leaves the snapshot as it was."""
    from pipelines import atomic

    target = tmp_path / "snap"
    target.mkdir()
    (target / "train.parquet").write_text("old rows")
    os.replace(target, tmp_path / f"{atomic.temp_prefix(target)}old")  # the state a SIGKILL leaves
    with pytest.raises(RuntimeError), atomic.atomic_dir(target) as tmp:
        (tmp / "train.parquet").write_text("half")
        raise RuntimeError("killed again")
    assert (target / "train.parquet").read_text() == "old rows"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["snap"]
