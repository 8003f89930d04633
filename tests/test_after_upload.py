"""What happens to a file once its fate is recorded: keep, move (never clobbering), delete,
failed_dir; and `sync`'s progress line on a terminal."""

from __future__ import annotations

import os
import pty
import subprocess
import sys

from conftest import Setup, in_state, records, uploaded, wait_until


def test_move_keeps_relative_path_and_never_overwrites(make_setup, run_daemon) -> None:
    setup: Setup = make_setup(after_upload="move", done_dir="done")
    done = setup.tmp / "done"
    (done / "sub").mkdir(parents=True)
    (done / "sub" / "report.pdf").write_bytes(b"an earlier report, not to be lost")
    daemon = run_daemon(setup.load())
    path = setup.write("sub/report.pdf", b"the new report")
    moved = done / "sub" / "report (1).pdf"
    wait_until(moved.exists, what="file moved to done_dir")
    # The move came after the commit: by the time the file is there, the row says uploaded.
    row = records(setup)[str(path)]
    assert row.state == "uploaded" and row.file_id in setup.api.api.files
    assert moved.read_bytes() == b"the new report"
    assert (done / "sub" / "report.pdf").read_bytes() == b"an earlier report, not to be lost"
    assert not path.exists()
    daemon.stop()


def test_delete_after_upload(make_setup, run_daemon) -> None:
    setup = make_setup(after_upload="delete")
    daemon = run_daemon(setup.load())
    path = setup.write("gone-after.txt", b"uploaded, then deleted")
    wait_until(lambda: not path.exists(), what="file deleted after upload")
    row = records(setup)[str(path)]
    assert row.state == "uploaded"
    assert setup.api.api.files[row.file_id].size == len(b"uploaded, then deleted")
    daemon.stop()


def test_failed_files_go_to_failed_dir(make_setup, run_daemon) -> None:
    setup = make_setup(failed_dir="failed")
    setup.api.faults.reject_pattern = "*.exe"
    daemon = run_daemon(setup.load())
    bad = setup.write("in/tool.exe", b"MZ")
    good = setup.write("in/fine.txt", b"ok")
    target = setup.tmp / "failed" / "in" / "tool.exe"
    wait_until(target.exists, what="rejected file moved to failed_dir")
    assert in_state(setup, "failed", [bad])
    wait_until(lambda: uploaded(setup, [good]), what="the other file uploaded")
    assert good.exists()  # keep: the default
    daemon.stop()


def test_sync_draws_a_progress_line_on_a_terminal(setup: Setup) -> None:
    for i in range(5):
        setup.write(f"p{i}.txt", b"progress")
    leader, follower = pty.openpty()
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "watcher", "sync", "--config", str(setup.config_path)],
            stdin=follower,
            stdout=follower,
            stderr=follower,
            env=setup.env(),
            timeout=60,
        )
        os.close(follower)
        output = b""
        while True:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # EIO: the terminal's other side is closed and drained
                break
            if not chunk:
                break
            output += chunk
    finally:
        os.close(leader)
    assert proc.returncode == 0
    text = output.decode(errors="replace")
    assert "\r[" in text and "5/5 (uploaded 5, failed 0, skipped 0)" in text, text[-500:]
