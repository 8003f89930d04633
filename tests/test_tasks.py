"""Tasks: one per uploaded file, followed to the end, recorded; against fake-api."""

from __future__ import annotations

import json
import sqlite3
import time

from conftest import Setup, records, wait_until

TASK = {"task": "Summarise {name} ({size} bytes, {relpath}) id={file_id}", "max_steps": 8}


def ended(setup: Setup, path, status: str = "done"):
    row = records(setup).get(str(path))
    return row if row and row.task_status == status else None


def task_table(**extra) -> dict:
    return {"task": {**TASK, **extra}}


def test_task_started_waited_and_recorded(make_setup, run_daemon) -> None:
    setup = make_setup(**task_table(result_dir="results", metadata={"team": "ops"}))
    daemon = run_daemon(setup.load())
    path = setup.write("sub/invoice 1.pdf", b"%PDF-1.7 invoice")
    row = wait_until(lambda: ended(setup, path), what="task done")
    (task,) = setup.api.api.tasks.values()
    assert task.files == [row.file_id]
    assert task.task == f"Summarise invoice 1.pdf (16 bytes, sub/invoice 1.pdf) id={row.file_id}"
    assert task.max_steps == 8 and task.metadata == {"team": "ops"}
    assert row.task_id == task.id
    assert "invoice 1.pdf" in json.loads(row.task_output)

    result_file = setup.tmp / "results" / "sub" / "invoice 1.pdf.result.json"
    result = json.loads(result_file.read_text())
    assert result["task_id"] == task.id and result["status"] == "done"
    assert result["file_id"] == row.file_id and result["path"] == str(path)
    assert daemon.stop() == 0


def test_response_model_output_and_failed_task(make_setup, run_daemon) -> None:
    schema = {"type": "object", "properties": {"total": {"type": "number"}}}
    setup = make_setup(task={"task": "Extract from {name}", "response_model": schema})
    daemon = run_daemon(setup.load())
    good = setup.write("ok.txt", b"total: 12")
    bad = setup.write("FAIL.txt", b"fake-api fails tasks whose text says FAIL")
    row = wait_until(lambda: ended(setup, good), what="task done")
    output = json.loads(row.task_output)
    assert isinstance(output, dict) and isinstance(output["total"], int | float)
    (task,) = [t for t in setup.api.api.tasks.values() if t.id == row.task_id]
    assert task.response_model == schema
    row = wait_until(lambda: ended(setup, bad, "failed"), what="task failed")
    assert "failed" in json.loads(row.task_output)  # the API's error text is kept
    assert row.state == "uploaded"  # the upload itself succeeded
    daemon.stop()


def test_delete_file_after_task(make_setup, run_daemon) -> None:
    setup = make_setup(**task_table(delete_file_after=True))
    daemon = run_daemon(setup.load())
    path = setup.write("tmp.txt", b"delete me later")
    row = wait_until(lambda: ended(setup, path), what="task done")
    wait_until(lambda: row.file_id not in setup.api.api.files, what="file deleted from the API")
    daemon.stop()


def test_restart_resumes_waiting_and_never_starts_twice(make_setup, run_daemon) -> None:
    setup = make_setup(**task_table())
    setup.api.api.task_duration_s = 3.0
    daemon = run_daemon(setup.load())
    path = setup.write("long.txt", b"takes a while")
    wait_until(lambda: (r := records(setup).get(str(path))) and r.task_id, what="task started")
    assert daemon.stop() == 0
    assert records(setup)[str(path)].task_status in ("waiting", "running")

    again = run_daemon(setup.load())
    row = wait_until(lambda: ended(setup, path), timeout=20, what="task done after restart")
    assert len(setup.api.api.tasks) == 1
    assert row.task_id in setup.api.api.tasks
    again.stop()


def test_expired_file_id_is_uploaded_again_before_the_task(make_setup, run_daemon) -> None:
    # First only upload, then age the upload past 24 h, then turn tasks on.
    setup = make_setup()
    path = setup.write("old.txt", b"uploaded yesterday")
    assert setup.cli("sync", "--config", str(setup.config_path)).returncode == 0
    old_id = records(setup)[str(path)].file_id
    db = sqlite3.connect(setup.load().manifest_path)
    db.execute("UPDATE files SET uploaded_at = ?", (time.time() - 25 * 3600,))
    db.commit()
    db.close()

    setup = make_setup(**task_table())
    daemon = run_daemon(setup.load())
    row = wait_until(lambda: ended(setup, path), what="task done")
    assert row.file_id != old_id
    (task,) = setup.api.api.tasks.values()
    assert task.files == [row.file_id]
    daemon.stop()


def test_sync_waits_for_tasks(make_setup) -> None:
    setup = make_setup(**task_table())
    paths = [setup.write(f"t{i}.txt", b"sync task") for i in range(3)]
    proc = setup.cli("sync", "--config", str(setup.config_path))
    assert proc.returncode == 0, proc.stderr
    rows = records(setup)
    assert all(rows[str(p)].task_status == "done" for p in paths)
    assert len(setup.api.api.tasks) == 3
