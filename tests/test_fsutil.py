"""Atomic writes under SIGTERM: the temporary folder goes, the target is whole or untouched."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from components.fsutil import Terminated, _SigtermGuard, atomic_path

ROOT = Path(__file__).resolve().parents[1]


def run_until(script: str, cwd: Path, marker: str = "writing") -> subprocess.CompletedProcess:
    """Run ``script`` in a fresh interpreter, send it SIGTERM once it prints ``marker``, wait for its end."""
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(script)], cwd=cwd, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=dict(os.environ, PYTHONPATH=str(ROOT)))
    try:
        line = proc.stdout.readline()
        assert line.strip() == marker, (line, proc.stderr.read() if proc.poll() is not None else "")
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return subprocess.CompletedProcess(proc.args, proc.returncode, line + out, err)


def test_sigterm_mid_parquet_write_leaves_nothing(tmp_path):
    (tmp_path / "table.parquet").write_bytes(b"the previous table")
    proc = run_until("""
        import os, time
        import pyarrow as pa, pyarrow.parquet as pq
        from components.fsutil import atomic_path

        batch = pa.table({"image": [os.urandom(1 << 14) for _ in range(64)]})  # 1 MiB
        with atomic_path("table.parquet") as tmp, pq.ParquetWriter(tmp, batch.schema, compression="none") as w:
            for i in range(300):  # ~3 s if no signal came
                w.write_table(batch)
                if i == 2:
                    print("writing", flush=True)
                time.sleep(0.01)
        print("finished", flush=True)
    """, tmp_path)
    assert proc.returncode == 143, proc
    assert "finished" not in proc.stdout and "Traceback" not in proc.stderr, proc
    assert sorted(p.name for p in tmp_path.iterdir()) == ["table.parquet"]  # no .table.parquet.*.tmp/
    assert (tmp_path / "table.parquet").read_bytes() == b"the previous table"  # untouched


def test_sigterm_during_ingest_write_is_one_line_and_leaves_nothing(tmp_path):
    import yaml
    from PIL import Image

    from components.config import Params

    for folder in ("bounding_box_train", "bounding_box_test", "query"):  # a tiny Market-1501
        (tmp_path / "raw" / folder).mkdir(parents=True)
        Image.new("RGB", (8, 16)).save(tmp_path / "raw" / folder / "0001_c1s1_000001_00.jpg")
    params = {name: {} for name in Params.model_fields} | {"data": {"layout": "market1501"}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    proc = run_until("""
        import sys, time
        from components.data import table
        from pipelines.cli import main

        real = table.pq.write_table

        def slow_write(*args, **kw):  # the long write of a big dataset's table
            print("writing", flush=True)
            time.sleep(20)
            real(*args, **kw)

        table.pq.write_table = slow_write
        sys.exit(main(["ingest", "--no-progress", "--input", "raw"]))
    """, tmp_path)
    assert proc.returncode == 143, proc
    err = [line for line in proc.stderr.splitlines() if " INFO " not in line]
    assert err == ["lrreid ingest: terminated (SIGTERM); no partial output was kept"], proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "params.yaml", "raw"]
    assert list((tmp_path / "data").iterdir()) == []  # no canonical.parquet, no .canonical.parquet.*.tmp/


def test_sigterm_after_the_write_waits_for_the_rename(tmp_path):
    # as in a stage process: SIGTERM's default action (an in-process Ray driver installs its own handler)
    previous = signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        _sigterm_after_the_write(tmp_path)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _sigterm_after_the_write(tmp_path):
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Terminated) as e:
        with _SigtermGuard() as guard:
            guard.arm(False)
            os.kill(os.getpid(), signal.SIGTERM)  # arrives while the output is being put in place
            (tmp_path / "out.txt").write_text("whole")
    assert e.value.code == 143 and (tmp_path / "out.txt").read_text() == "whole"
    assert signal.getsignal(signal.SIGTERM) == before  # the previous handler is back

    with pytest.raises(Terminated):
        with atomic_path(tmp_path / "out.txt") as tmp:
            tmp.write_text("half")
            os.kill(os.getpid(), signal.SIGTERM)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]
    assert (tmp_path / "out.txt").read_text() == "whole"
