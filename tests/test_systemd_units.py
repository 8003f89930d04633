"""The systemd units in systemd/: the lines the daemon relies on, and `systemd-analyze verify`."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from watcher.config import CREDENTIAL_NAME
from watcher.constants import SHUTDOWN_GRACE_S

ROOT = Path(__file__).resolve().parent.parent
SYSTEM_UNIT = ROOT / "systemd" / "smooth-watcher.service"
USER_UNIT = ROOT / "systemd" / "user" / "smooth-watcher.service"
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")

Unit = dict[str, list[tuple[str, str]]]


def parse_unit(text: str) -> Unit:
    """Sections of (key, value) pairs in file order. Not configparser: systemd allows a key
    several times (each adds to a list, an empty value resets it)."""
    unit: Unit = {}
    section: list[tuple[str, str]] | None = None
    pending = ""
    for raw in text.splitlines():
        line = pending + raw.strip()
        pending = ""
        if not line or line[0] in "#;":
            continue
        if line.endswith("\\"):  # continued on the next line
            pending = line[:-1].rstrip() + " "
            continue
        if line.startswith("[") and line.endswith("]"):
            section = unit.setdefault(line[1:-1], [])
            continue
        assert section is not None, f"assignment outside a section: {line!r}"
        key, sep, value = line.partition("=")
        assert sep, f"not an assignment: {line!r}"
        section.append((key.strip(), value.strip()))
    return unit


def values(unit: Unit, section: str, key: str) -> list[str]:
    return [v for k, v in unit.get(section, []) if k == key]


def one(unit: Unit, section: str, key: str) -> str:
    found = values(unit, section, key)
    assert len(found) == 1, f"[{section}] {key}= set {len(found)} times"
    return found[0]


@pytest.fixture(params=[SYSTEM_UNIT, USER_UNIT], ids=["system", "user"])
def unit(request: pytest.FixtureRequest) -> Unit:
    return parse_unit(request.param.read_text())


def test_both_units_keep_the_daemon_contract(unit: Unit) -> None:
    assert one(unit, "Service", "Type") == "notify"
    assert one(unit, "Service", "NotifyAccess") == "main"
    argv = shlex.split(one(unit, "Service", "ExecStart"))
    assert Path(argv[0]).name == "smooth-watcher" and argv[1] == "run"
    assert one(unit, "Service", "ExecReload") == "/bin/kill -HUP $MAINPID"
    assert one(unit, "Service", "Restart") == "on-failure"
    prevent = " ".join(values(unit, "Service", "RestartPreventExitStatus")).split()
    assert {"2", "3"} <= set(prevent)  # config error, key rejected: a restart cannot help
    assert int(one(unit, "Service", "WatchdogSec")) > 0
    # The daemon's grace period for uploads in flight must end before systemd's SIGKILL.
    assert int(one(unit, "Service", "TimeoutStopSec")) > SHUTDOWN_GRACE_S
    assert one(unit, "Service", "UMask") == "0077"
    # ctypes/libffi (watchdog) may need W+X memory.
    assert not values(unit, "Service", "MemoryDenyWriteExecute")


def test_system_unit() -> None:
    unit = parse_unit(SYSTEM_UNIT.read_text())
    argv = shlex.split(one(unit, "Service", "ExecStart"))
    assert argv == [
        "/usr/local/bin/smooth-watcher",
        "run",
        "--config",
        "/etc/smooth-watcher/config.toml",
    ]
    name, _, source = one(unit, "Service", "LoadCredential").partition(":")
    assert (name, source) == (CREDENTIAL_NAME, "/etc/smooth-watcher/api-key")
    assert one(unit, "Service", "StateDirectory") == "smooth-watcher"
    assert one(unit, "Service", "User") == one(unit, "Service", "Group") == "smooth-watcher"
    assert one(unit, "Service", "ProtectSystem") == "strict"
    assert values(unit, "Service", "ReadWritePaths")
    assert one(unit, "Service", "CapabilityBoundingSet") == ""
    assert one(unit, "Service", "SystemCallFilter") == "@system-service"
    assert one(unit, "Service", "RestrictAddressFamilies") == "AF_UNIX AF_INET AF_INET6"
    assert one(unit, "Install", "WantedBy") == "multi-user.target"


def test_user_unit() -> None:
    unit = parse_unit(USER_UNIT.read_text())
    assert one(unit, "Service", "ExecStart") == "%h/.local/bin/smooth-watcher run"
    assert one(unit, "Install", "WantedBy") == "default.target"
    for key in ("User", "Group", "LoadCredential"):  # meaningless or unavailable per user
        assert not values(unit, "Service", key), key
    # The manifest must stay where `smooth-watcher status` run from a shell looks for it.
    assert not values(unit, "Service", "StateDirectory")


def test_parser_keeps_duplicates_and_continuations() -> None:
    unit = parse_unit("[Service]\n# c\nA=1\nA=2 \\\n  3\n; c\nB=\n")
    assert unit == {"Service": [("A", "1"), ("A", "2 3"), ("B", "")]}


# --- systemd-analyze verify ---------------------------------------------------------------------


def verify(unit_file: Path, tmp_path: Path, *, user: bool = False) -> str:
    """`systemd-analyze verify`; returns its stderr, failing on any problem it reports."""
    assert SYSTEMD_ANALYZE is not None
    env = dict(os.environ, SYSTEMD_LOG_COLOR="0", SYSTEMD_PAGER="")
    if user:  # a user manager needs a runtime dir; %h is taken from $HOME
        runtime = tmp_path / "runtime"
        runtime.mkdir(mode=0o700, exist_ok=True)
        env.update(XDG_RUNTIME_DIR=str(runtime), HOME=str(tmp_path / "home"))
    command = [SYSTEMD_ANALYZE, *(["--user"] if user else []), "verify"]
    command += ["--man=no", "--generators=no", str(unit_file)]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=30)
    stderr = result.stderr
    if user and result.returncode != 0 and "Failed to initialize manager" in stderr:
        pytest.skip(f"systemd-analyze --user verify does not work here: {stderr.strip()}")
    # Typos and bad values are only warnings ("Unknown key 'Tpye' in section [Service],
    # ignoring."; older/newer: "Unknown key name", "Unknown lvalue"), exit status 0: look for
    # any parser diagnostic, which systemd prefixes with the file name and line number.
    diagnostics = [
        line
        for line in stderr.splitlines()
        if re.match(rf"{re.escape(str(unit_file))}:\d+:", line) or "Unknown" in line
    ]
    assert result.returncode == 0 and not diagnostics, stderr
    return stderr


def runnable_copy(unit_file: Path, tmp_path: Path) -> Path:
    """The unit with ExecStart pointing at /bin/true: verify checks that the command exists."""
    text = re.sub(
        r"^ExecStart=\S+", "ExecStart=/bin/true", unit_file.read_text(), flags=re.MULTILINE
    )
    copy = tmp_path / "units" / unit_file.name
    copy.parent.mkdir(exist_ok=True)
    copy.write_text(text)
    return copy


needs_analyze = pytest.mark.skipif(SYSTEMD_ANALYZE is None, reason="systemd-analyze not installed")


@needs_analyze
def test_system_unit_verifies(tmp_path: Path) -> None:
    verify(runnable_copy(SYSTEM_UNIT, tmp_path), tmp_path)


@needs_analyze
def test_user_unit_verifies(tmp_path: Path) -> None:
    # The unit as shipped: %h/.local/bin/smooth-watcher exists under the test's $HOME.
    executable = tmp_path / "home" / ".local" / "bin" / "smooth-watcher"
    executable.parent.mkdir(parents=True)
    shutil.copy("/bin/true", executable)
    verify(USER_UNIT, tmp_path, user=True)


@needs_analyze
def test_verify_catches_a_typo(tmp_path: Path) -> None:
    """The check above is not vacuous on this systemd version: a misspelt key fails it."""
    copy = runnable_copy(SYSTEM_UNIT, tmp_path)
    copy.write_text(copy.read_text().replace("ProtectClock=yes", "ProtectClok=yes"))
    with pytest.raises(AssertionError, match="ProtectClok"):
        verify(copy, tmp_path)
