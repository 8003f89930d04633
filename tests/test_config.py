"""watcher/config.py: defaults, validation messages (key, file, line), paths, env and the key."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from watcher import checks, config
from watcher.config import ConfigError

ROOT = Path(__file__).resolve().parent.parent
KEY = "sk-unit-test-0123456789abcdef"

# The defaults written in SPEC.md's Configuration section.
SPEC_EXCLUDE = (".*", "*~", "*.tmp", "*.part", "*.crdownload", "*.swp", "~$*")
SPEC_PLACEHOLDERS = ("{name}", "{path}", "{relpath}", "{file_id}", "{size}", "{sha256}")


@pytest.fixture
def drop(tmp_path: Path) -> Path:
    path = tmp_path / "drop"
    path.mkdir()
    return path


def parse(
    drop: Path,
    watch: dict[str, Any] | None = None,
    *,
    extra_watches: list[dict[str, Any]] | None = None,
    **sections: Any,
) -> config.Config:
    data: dict[str, Any] = dict(sections)
    data["watch"] = [{"path": str(drop), **(watch or {})}, *(extra_watches or [])]
    return config.parse(data, source=drop.parent / "config.toml")


def write(tmp_path: Path, text: str, name: str = "config.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


# --- defaults -----------------------------------------------------------------------------------


def test_minimal_config_gets_spec_defaults(tmp_path: Path, drop: Path) -> None:
    cfg = config.load(write(tmp_path, '[[watch]]\npath = "drop"\n'))

    assert cfg.api.base_url == "https://api.smooth.sh/api/v1"
    assert cfg.api.api_key_file is None
    assert cfg.api.concurrency == 4
    assert cfg.api.max_requests_per_s == 0
    assert cfg.api.timeout_s == 600
    assert cfg.api.max_attempts == 8
    assert cfg.api.backoff_initial_s == 1.0
    assert cfg.api.backoff_max_s == 300.0
    assert cfg.log_format == "auto"
    assert cfg.log_level == "info"
    assert cfg.metrics_listen is None
    assert cfg.manifest_path == config.default_manifest_path()
    assert cfg.source == tmp_path / "config.toml"

    (watch,) = cfg.watches
    assert watch.path == drop.resolve()
    assert watch.recursive is True
    assert watch.include == ()
    assert tuple(watch.exclude) == SPEC_EXCLUDE
    assert watch.settle_s == 2.0
    assert watch.max_file_size == 512 * 1024 * 1024
    assert watch.purpose == ""
    assert watch.follow_symlinks is False
    assert watch.poll is False
    assert watch.rescan_interval_s == 600
    assert watch.after_upload == "keep"
    assert watch.done_dir is None
    assert watch.failed_dir is None
    assert watch.task is None


def test_task_table_defaults(drop: Path) -> None:
    cfg = parse(drop, {"task": {"task": "Summarise {name}"}})
    task = cfg.watches[0].task
    assert task is not None
    assert task.task == "Summarise {name}"
    assert task.url == ""
    assert task.max_steps == 32
    assert dict(task.metadata) == {}
    assert dict(task.response_model) == {}
    assert task.wait is True
    assert task.result_dir is None
    assert task.delete_file_after is False


def test_full_config_values_are_kept(tmp_path: Path, drop: Path) -> None:
    done = tmp_path / "done"
    cfg = parse(
        drop,
        {
            "include": ["*.pdf"],
            "exclude": ["*.bak"],
            "settle_s": 0,
            "max_file_size": "2GB",
            "purpose": "p" * 64,
            "after_upload": "move",
            "done_dir": str(done),
            "task": {
                "task": "{name} {path} {relpath} {file_id} {size} {sha256}",
                "max_steps": 128,
                "metadata": {"a": 1, "b": "x", "c": True},
                "response_model": {"type": "object"},
                "result_dir": str(tmp_path / "results"),
            },
        },
        api={"concurrency": 16, "max_requests_per_s": 2.5, "timeout_s": 30},
        metrics={"listen": "127.0.0.1:9478"},
        log={"format": "json", "level": "debug"},
        manifest={"path": str(tmp_path / "m.sqlite3")},
    )
    watch = cfg.watches[0]
    assert watch.include == ("*.pdf",)
    assert watch.exclude == ("*.bak",)
    assert watch.settle_s == 0.0
    assert watch.max_file_size == 2 * 10**9
    assert watch.done_dir == done
    assert watch.task is not None and watch.task.max_steps == 128
    assert watch.task.result_dir == tmp_path / "results"
    assert dict(watch.task.metadata) == {"a": 1, "b": "x", "c": True}
    assert cfg.api.concurrency == 16
    assert cfg.api.max_requests_per_s == 2.5
    assert cfg.api.timeout_s == 30.0
    assert cfg.metrics_listen == ("127.0.0.1", 9478)
    assert (cfg.log_format, cfg.log_level) == ("json", "debug")
    assert cfg.manifest_path == tmp_path / "m.sqlite3"


# --- unknown keys: dotted name, file and line ----------------------------------------------------


@pytest.mark.parametrize(
    ("text", "dotted", "line"),
    [
        ('foo = 1\n[[watch]]\npath = "drop"\n', "foo", 1),
        ('[api]\ntimeout_s = 5\nconcurency = 4\n[[watch]]\npath = "drop"\n', "api.concurency", 3),
        ('[manifest]\npth = "x"\n[[watch]]\npath = "drop"\n', "manifest.pth", 2),
        ('[log]\nlevel = "info"\ncolour = "red"\n[[watch]]\npath = "drop"\n', "log.colour", 3),
        ('[metrics]\nport = 1\n[[watch]]\npath = "drop"\n', "metrics.port", 2),
        ('[[watch]]\npath = "drop"\nsetle_s = 1.0\n', "watch[0].setle_s", 3),
        (
            '[[watch]]\npath = "drop"\n\n[[watch]]\npath = "other"\n# c\n"bogus" = 1\n',
            "watch[1].bogus",
            7,
        ),
        (
            '[[watch]]\npath = "drop"\n[watch.task]\ntask = "x"\nnope = 1\n',
            "watch[0].task.nope",
            5,
        ),
        (
            '[[watch]]\npath = "other"\n[[watch]]\npath = "drop"\n[watch.task]\ntask = "x"\n'
            "  wiat = true\n",
            "watch[1].task.wiat",
            7,
        ),
    ],
)
def test_unknown_key_names_key_file_and_line(
    tmp_path: Path, drop: Path, text: str, dotted: str, line: int
) -> None:
    (tmp_path / "other").mkdir()
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as excinfo:
        config.load(path)
    message = str(excinfo.value)
    assert f"{path}:{line}: {dotted}: " in message
    assert "unknown key" in message


def test_unknown_key_suggests_the_close_one(tmp_path: Path, drop: Path) -> None:
    path = write(tmp_path, '[[watch]]\npath = "drop"\nsetle_s = 1.0\n')
    with pytest.raises(ConfigError, match=r"did you mean 'settle_s'"):
        config.load(path)


def test_unknown_table_names_its_header_line(tmp_path: Path, drop: Path) -> None:
    path = write(tmp_path, '[[watch]]\npath = "drop"\n\n[apii]\nbase_url = "http://x"\n')
    with pytest.raises(ConfigError) as excinfo:
        config.load(path)
    assert f"{path}:4: apii: " in str(excinfo.value)


def test_type_error_from_file_names_line(tmp_path: Path, drop: Path) -> None:
    path = write(tmp_path, '[api]\n\nconcurrency = "4"\n[[watch]]\npath = "drop"\n')
    with pytest.raises(ConfigError) as excinfo:
        config.load(path)
    assert f"{path}:3: api.concurrency: " in str(excinfo.value)


# --- wrong types and impossible values -----------------------------------------------------------


@pytest.mark.parametrize(
    ("section", "values", "dotted"),
    [
        ("api", {"concurrency": "4"}, "api.concurrency"),
        ("api", {"concurrency": True}, "api.concurrency"),
        ("api", {"concurrency": 4.0}, "api.concurrency"),
        ("api", {"max_attempts": False}, "api.max_attempts"),
        ("api", {"timeout_s": "600"}, "api.timeout_s"),
        ("api", {"timeout_s": True}, "api.timeout_s"),
        ("api", {"base_url": 5}, "api.base_url"),
        ("api", {"api_key_file": 1}, "api.api_key_file"),
        ("watch", {"recursive": 1}, "watch[0].recursive"),
        ("watch", {"include": "*.pdf"}, "watch[0].include"),
        ("watch", {"exclude": ["*.tmp", 3]}, "watch[0].exclude"),
        ("watch", {"exclude": [""]}, "watch[0].exclude"),
        ("watch", {"settle_s": "2"}, "watch[0].settle_s"),
        ("watch", {"follow_symlinks": "yes"}, "watch[0].follow_symlinks"),
        ("watch", {"path": 3}, "watch[0].path"),
        ("watch", {"task": "Summarise"}, "watch[0].task"),
        ("task", {"wait": "true"}, "watch[0].task.wait"),
        ("task", {"max_steps": 3.5}, "watch[0].task.max_steps"),
        ("task", {"metadata": {"nested": {"a": 1}}}, "watch[0].task.metadata"),
        ("task", {"response_model": "free"}, "watch[0].task.response_model"),
        ("manifest", {"path": 1}, "manifest.path"),
    ],
)
def test_wrong_type_is_rejected_naming_the_key(
    drop: Path, section: str, values: dict[str, Any], dotted: str
) -> None:
    with pytest.raises(ConfigError, match=rf": {re.escape(dotted)}: "):
        _parse_with(drop, section, values)


@pytest.mark.parametrize(
    ("section", "values", "dotted", "needle"),
    [
        ("api", {"concurrency": 0}, "api.concurrency", "between 1 and"),
        ("api", {"concurrency": -3}, "api.concurrency", ""),
        ("api", {"max_attempts": 0}, "api.max_attempts", ""),
        ("api", {"timeout_s": 0}, "api.timeout_s", "> 0"),
        ("api", {"max_requests_per_s": -1}, "api.max_requests_per_s", ""),
        ("api", {"backoff_initial_s": -0.5}, "api.backoff_initial_s", ""),
        ("api", {"base_url": "ftp://example.com"}, "api.base_url", "URL"),
        ("api", {"base_url": "api.smooth.sh"}, "api.base_url", "URL"),
        ("task", {"max_steps": 1}, "watch[0].task.max_steps", "between 2 and 128"),
        ("task", {"max_steps": 129}, "watch[0].task.max_steps", "between 2 and 128"),
        ("task", {"task": "   "}, "watch[0].task.task", "empty"),
        ("task", {"task": "Summarise {name"}, "watch[0].task.task", "template"),
        ("watch", {"settle_s": -1}, "watch[0].settle_s", "≥ 0"),
        ("watch", {"rescan_interval_s": -1}, "watch[0].rescan_interval_s", ""),
        ("watch", {"purpose": "x" * 65}, "watch[0].purpose", "64"),
        ("watch", {"max_file_size": "12 parsecs"}, "watch[0].max_file_size", "12 parsecs"),
        ("watch", {"max_file_size": 0}, "watch[0].max_file_size", "positive"),
        ("watch", {"max_file_size": -5}, "watch[0].max_file_size", "positive"),
        ("watch", {"after_upload": "archive"}, "watch[0].after_upload", "keep, move, delete"),
        ("metrics", {"listen": "nope"}, "metrics.listen", "host:port"),
        ("metrics", {"listen": "127.0.0.1:0"}, "metrics.listen", "host:port"),
        ("metrics", {"listen": "127.0.0.1:65536"}, "metrics.listen", "host:port"),
        ("metrics", {"listen": ":9478"}, "metrics.listen", "host:port"),
        ("log", {"format": "xml"}, "log.format", "auto, json, console"),
        ("log", {"level": "verbose"}, "log.level", ""),
    ],
)
def test_impossible_value_is_rejected_naming_the_key(
    drop: Path, section: str, values: dict[str, Any], dotted: str, needle: str
) -> None:
    with pytest.raises(ConfigError, match=rf": {re.escape(dotted)}: ") as excinfo:
        _parse_with(drop, section, values)
    assert needle in str(excinfo.value)


def test_nan_duration_is_rejected(drop: Path) -> None:
    with pytest.raises(ConfigError, match=r"watch\[0\]\.settle_s"):
        parse(drop, {"settle_s": float("nan")})


def test_size_that_rounds_to_zero_bytes_is_rejected(drop: Path) -> None:
    with pytest.raises(ConfigError, match=r"watch\[0\]\.max_file_size"):
        parse(drop, {"max_file_size": "0.1B"})


def test_purpose_of_64_characters_is_fine(drop: Path) -> None:
    assert parse(drop, {"purpose": "é" * 64}).watches[0].purpose == "é" * 64


def _parse_with(drop: Path, section: str, values: dict[str, Any]) -> config.Config:
    if section == "watch":
        return parse(drop, values)
    if section == "task":
        return parse(drop, {"task": {"task": "Summarise {name}", **values}})
    return parse(drop, **{section: values})


def test_section_that_is_not_a_table(drop: Path) -> None:
    with pytest.raises(ConfigError, match=r": api: expected a table"):
        parse(drop, api="https://example.com")


# --- the watch list ------------------------------------------------------------------------------


@pytest.mark.parametrize("watch", [None, [], {"path": "x"}])
def test_missing_watch_is_rejected(tmp_path: Path, watch: Any) -> None:
    data: dict[str, Any] = {"api": {}}
    if watch is not None:
        data["watch"] = watch
    with pytest.raises(ConfigError, match=r"\[\[watch\]\]"):
        config.parse(data, source=tmp_path / "c.toml")


def test_watch_without_path(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"watch\[0\]\.path: is required"):
        config.parse({"watch": [{"recursive": True}]}, source=tmp_path / "c.toml")


def test_watch_path_missing_is_rejected_with_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "no such folder"
    with pytest.raises(ConfigError, match=r"watch\[0\]\.path: ") as excinfo:
        config.parse({"watch": [{"path": str(missing)}]}, source=tmp_path / "c.toml")
    assert str(missing) in str(excinfo.value)
    assert "does not exist" in str(excinfo.value)


def test_watch_path_that_is_a_file_is_rejected(tmp_path: Path) -> None:
    file = tmp_path / "file.txt"
    file.write_text("x")
    with pytest.raises(ConfigError, match=r"watch\[0\]\.path: .*not a directory") as excinfo:
        config.parse({"watch": [{"path": str(file)}]}, source=tmp_path / "c.toml")
    assert str(file) in str(excinfo.value)


def test_missing_watch_path_is_allowed_without_check_paths(tmp_path: Path) -> None:
    missing = tmp_path / "later"
    cfg = config.parse({"watch": [{"path": str(missing)}]}, check_paths=False)
    assert cfg.watches[0].path == missing


def test_same_path_twice_is_rejected(tmp_path: Path, drop: Path) -> None:
    with pytest.raises(ConfigError, match=r"watch\[1\]\.path: .*already watched by watch\[0\]"):
        parse(drop, extra_watches=[{"path": str(tmp_path / "drop" / ".." / "drop")}])


@pytest.mark.parametrize("parent_first", [True, False])
def test_nested_recursive_watches_are_rejected(drop: Path, parent_first: bool) -> None:
    child = drop / "sub"
    child.mkdir()
    watches = [{"path": str(drop)}, {"path": str(child)}]
    if not parent_first:
        watches.reverse()
    with pytest.raises(ConfigError, match=r"already watched by") as excinfo:
        config.parse({"watch": watches}, source=drop.parent / "c.toml")
    child_index = 1 if parent_first else 0
    assert f"watch[{child_index}].path" in str(excinfo.value)


def test_nested_under_non_recursive_watch_is_fine(drop: Path) -> None:
    child = drop / "sub"
    child.mkdir()
    cfg = parse(drop, {"recursive": False}, extra_watches=[{"path": str(child)}])
    assert [w.path for w in cfg.watches] == [drop.resolve(), child.resolve()]


def test_move_needs_done_dir(drop: Path) -> None:
    with pytest.raises(ConfigError, match=r"watch\[0\]\.done_dir: .*after_upload = \"move\""):
        parse(drop, {"after_upload": "move"})


@pytest.mark.parametrize("key", ["done_dir", "failed_dir"])
def test_done_or_failed_dir_inside_the_watched_folder_is_rejected(drop: Path, key: str) -> None:
    with pytest.raises(ConfigError, match=rf"watch\[0\]\.{key}: .*inside the watched folder"):
        parse(drop, {"after_upload": "move", "done_dir": str(drop.parent / "ok"), key: "drop/x"})


def test_done_dir_equal_to_non_recursive_root_is_rejected(drop: Path) -> None:
    with pytest.raises(ConfigError, match=r"watch\[0\]\.done_dir"):
        parse(drop, {"recursive": False, "after_upload": "move", "done_dir": str(drop)})


def test_task_template_with_unknown_placeholder_lists_the_known_ones(drop: Path) -> None:
    with pytest.raises(ConfigError, match=r"watch\[0\]\.task\.task: .*\{nope\}") as excinfo:
        parse(drop, {"task": {"task": "Summarise {name} for {nope}"}})
    for placeholder in SPEC_PLACEHOLDERS:
        assert placeholder in str(excinfo.value)


def test_task_table_needs_task(drop: Path) -> None:
    with pytest.raises(ConfigError, match=r"watch\[0\]\.task\.task: is required"):
        parse(drop, {"task": {"max_steps": 4}})


# --- TOML errors and file errors -----------------------------------------------------------------


def test_invalid_toml_names_file_and_line(tmp_path: Path) -> None:
    path = write(tmp_path, '[api]\nconcurrency = 4\n[[watch]\npath = "x"\n')
    with pytest.raises(ConfigError) as excinfo:
        config.load(path)
    message = str(excinfo.value)
    assert message.startswith(f"{path}: invalid TOML")
    assert "line 3" in message


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found") as excinfo:
        config.load(tmp_path / "nope.toml")
    assert str(tmp_path / "nope.toml") in str(excinfo.value)


def test_config_that_is_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_bytes(b'[[watch]]\npath = "\xff"\n')
    with pytest.raises(ConfigError, match="cannot read"):
        config.load(path)


# --- base_url and the environment ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("https://api.example.test/api", "https://api.example.test/api/v1"),
        ("https://api.example.test/api/", "https://api.example.test/api/v1"),
        ("https://api.example.test/api/v1", "https://api.example.test/api/v1"),
        ("https://api.example.test/api/v1/", "https://api.example.test/api/v1"),
        ("http://127.0.0.1:8000", "http://127.0.0.1:8000/v1"),
    ],
)
def test_base_url_gets_v1(drop: Path, given: str, expected: str) -> None:
    assert parse(drop, api={"base_url": given}).api.base_url == expected


def test_base_url_env_overrides_the_file(drop: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SMOOTH_BASE_URL", "http://127.0.0.1:9/api")
    cfg = parse(drop, api={"base_url": "https://file.example.test/api/v1"})
    assert cfg.api.base_url == "http://127.0.0.1:9/api/v1"
    # Without a base_url in the file too.
    assert parse(drop).api.base_url == "http://127.0.0.1:9/api/v1"


def test_invalid_base_url_env_is_an_error_naming_it(
    drop: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SMOOTH_BASE_URL", "not a url")
    with pytest.raises(ConfigError) as excinfo:
        parse(drop)
    assert str(excinfo.value).startswith("$SMOOTH_BASE_URL: ")


# --- sizes ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("512MiB", 512 * 2**20),
        ("2GB", 2 * 10**9),
        ("1.5KiB", 1536),
        ("10 kb", 10_000),
        ("1TiB", 2**40),
        ("7B", 7),
        ("42", 42),
        (100, 100),
    ],
)
def test_parse_size(value: Any, expected: int) -> None:
    assert checks.parse_size(value) == expected


@pytest.mark.parametrize("value", ["12 parsecs", "", "MiB", "-1MiB", "0", "0KiB", 0, -1, True, 1.5])
def test_parse_size_rejects(value: Any) -> None:
    with pytest.raises(ValueError):
        checks.parse_size(value)


# --- paths ---------------------------------------------------------------------------------------


def test_relative_paths_resolve_against_the_config_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    conf_dir = tmp_path / "etc"
    conf_dir.mkdir()
    (tmp_path / "drop").mkdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # relative to the file, not to the working directory
    path = write(
        conf_dir,
        '[api]\napi_key_file = "key"\n[manifest]\npath = "state/m.sqlite3"\n'
        '[[watch]]\npath = "../drop"\nafter_upload = "move"\ndone_dir = "../done"\n'
        '[watch.task]\ntask = "x"\nresult_dir = "results"\n',
    )
    cfg = config.load(path)
    assert cfg.watches[0].path == (tmp_path / "drop").resolve()
    assert cfg.watches[0].done_dir is not None
    assert cfg.watches[0].done_dir.resolve() == (tmp_path / "done").resolve()
    assert cfg.api.api_key_file == conf_dir / "key"
    assert cfg.manifest_path == conf_dir / "state" / "m.sqlite3"
    assert cfg.watches[0].task is not None
    assert cfg.watches[0].task.result_dir == conf_dir / "results"


def test_watch_path_expands_env_and_user(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "drop").mkdir()
    monkeypatch.setenv("DROP_BASE", str(tmp_path))
    cfg = config.parse({"watch": [{"path": "$DROP_BASE/drop"}]}, source=Path("/nowhere/c.toml"))
    assert cfg.watches[0].path == (tmp_path / "drop").resolve()


def test_find_config_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    platform_default = tmp_path / "xdg" / "smooth-watcher" / "config.toml"
    assert config.find_config(None) == platform_default
    assert config.default_config_path() == platform_default

    monkeypatch.setenv("SMOOTH_WATCHER_CONFIG", str(tmp_path / "env.toml"))
    assert config.find_config(None) == tmp_path / "env.toml"
    assert config.find_config(str(tmp_path / "flag.toml")) == tmp_path / "flag.toml"

    monkeypatch.setenv("SMOOTH_WATCHER_CONFIG", "")
    assert config.find_config(None) == platform_default


def test_default_manifest_path_honours_state_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdgstate"))
    assert config.default_manifest_path() == (
        tmp_path / "xdgstate" / "smooth-watcher" / "manifest.sqlite3"
    )
    monkeypatch.setenv("STATE_DIRECTORY", str(tmp_path / "state"))
    assert config.default_manifest_path() == tmp_path / "state" / "manifest.sqlite3"
    # systemd gives a colon-separated list when StateDirectory= names several: the first wins.
    monkeypatch.setenv("STATE_DIRECTORY", f"{tmp_path / 'one'}:{tmp_path / 'two'}")
    assert config.default_manifest_path() == tmp_path / "one" / "manifest.sqlite3"


def test_manifest_default_used_by_parse(
    tmp_path: Path, drop: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("STATE_DIRECTORY", str(tmp_path / "state"))
    assert parse(drop).manifest_path == tmp_path / "state" / "manifest.sqlite3"


def test_watch_for(tmp_path: Path, drop: Path) -> None:
    other = tmp_path / "other"
    other.mkdir()
    cfg = parse(drop, extra_watches=[{"path": str(other)}])
    root = drop.resolve()
    assert cfg.watch_for(root / "a" / "b.txt") is cfg.watches[0]
    assert cfg.watch_for(other.resolve() / "x") is cfg.watches[1]
    assert cfg.watch_for(tmp_path.resolve() / "drop2" / "x") is None


# --- the API key ---------------------------------------------------------------------------------


def _cfg_with_key_file(drop: Path, key_file: Path | None) -> config.Config:
    api = {"api_key_file": str(key_file)} if key_file else {}
    return parse(drop, api=api)


def test_key_file_comes_first(tmp_path: Path, drop: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    key_file = tmp_path / "key"
    key_file.write_text(f"  {KEY}\n")
    key_file.chmod(0o600)
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "smooth-api-key").write_text("from-credentials")
    monkeypatch.setenv("CIRCLEMIND_API_KEY", "from-env")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    warnings: list[str] = []
    assert config.resolve_api_key(_cfg_with_key_file(drop, key_file), warnings.append) == KEY
    assert warnings == []


def test_env_key_before_credentials(
    tmp_path: Path, drop: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "smooth-api-key").write_text("from-credentials\n")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    monkeypatch.setenv("CIRCLEMIND_API_KEY", f" {KEY} ")
    cfg = _cfg_with_key_file(drop, None)
    assert config.resolve_api_key(cfg) == KEY
    monkeypatch.setenv("CIRCLEMIND_API_KEY", "   ")  # blank: as if unset
    assert config.resolve_api_key(cfg) == "from-credentials"
    monkeypatch.delenv("CIRCLEMIND_API_KEY")
    assert config.resolve_api_key(cfg) == "from-credentials"


def test_no_key_anywhere_is_a_config_error(
    tmp_path: Path, drop: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path / "empty-creds"))
    with pytest.raises(ConfigError, match="no API key") as excinfo:
        config.resolve_api_key(_cfg_with_key_file(drop, None))
    assert "CIRCLEMIND_API_KEY" in str(excinfo.value)


@pytest.mark.parametrize("content", ["", "\n", "   \n\n"])
def test_empty_key_file_is_an_error(tmp_path: Path, drop: Path, content: str) -> None:
    key_file = tmp_path / "key"
    key_file.write_text(content)
    with pytest.raises(ConfigError, match="empty") as excinfo:
        config.resolve_api_key(_cfg_with_key_file(drop, key_file))
    assert str(key_file) in str(excinfo.value)


def test_missing_key_file_is_an_error(tmp_path: Path, drop: Path) -> None:
    with pytest.raises(ConfigError, match=r"api\.api_key_file: cannot read"):
        config.resolve_api_key(_cfg_with_key_file(drop, tmp_path / "absent"))


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644])
def test_key_file_readable_by_others_warns_without_the_key(
    tmp_path: Path, drop: Path, mode: int
) -> None:
    key_file = tmp_path / "key"
    key_file.write_text(KEY + "\n")
    key_file.chmod(mode)
    warnings: list[str] = []
    assert config.resolve_api_key(_cfg_with_key_file(drop, key_file), warnings.append) == KEY
    assert len(warnings) == 1
    assert str(key_file) in warnings[0]
    assert KEY not in warnings[0]


def test_secret_repr_hides_the_key(tmp_path: Path, drop: Path) -> None:
    key_file = tmp_path / "key"
    key_file.write_text(KEY)
    key_file.chmod(0o600)
    secret = config.resolve_api_key(_cfg_with_key_file(drop, key_file))
    assert isinstance(secret, config.Secret)
    assert secret == KEY
    assert KEY not in repr(secret)
    assert KEY not in repr({"key": secret})
    assert KEY not in f"{secret!r}"


# --- through the command line --------------------------------------------------------------------


@dataclass
class CliRun:
    config: Path
    drop: Path
    returncode: int
    stdout: str
    stderr: str


@pytest.fixture(scope="module")
def check_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, CliRun]:
    """``smooth-watcher check`` on a few configs, as subprocesses started side by side."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("CIRCLEMIND_API_KEY", "SMOOTH_BASE_URL", "SMOOTH_WATCHER_CONFIG")
    }
    env["PYTHONPATH"] = str(ROOT)
    texts = {
        "unknown key": '[[watch]]\npath = "drop"\n\nsetle_s = 1\n',
        "bad toml": "[[watch]\n",
        "good": '[[watch]]\npath = "{drop}"\n',
    }
    started = {}
    for name, text in texts.items():
        folder = tmp_path_factory.mktemp("cli")
        drop = folder / "drop"
        drop.mkdir()
        (drop / "a.txt").write_text("a")
        path = write(folder, text.replace("{drop}", str(drop)))
        proc = subprocess.Popen(
            [sys.executable, "-m", "watcher", "check", "--config", str(path)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            cwd=folder,
        )
        started[name] = (path, drop, proc)
    runs = {}
    for name, (path, drop, proc) in started.items():
        out, err = proc.communicate(timeout=60)
        runs[name] = CliRun(path, drop, proc.returncode, out, err)
    return runs


def test_check_config_error_exits_2_with_one_line(check_runs: dict[str, CliRun]) -> None:
    run = check_runs["unknown key"]
    assert run.returncode == 2, run
    lines = run.stderr.splitlines()
    assert len(lines) == 1, run.stderr
    assert "watch[0].setle_s" in lines[0]
    assert f"{run.config}:4" in lines[0]
    assert "Traceback" not in run.stderr + run.stdout


def test_check_invalid_toml_exits_2_without_traceback(check_runs: dict[str, CliRun]) -> None:
    run = check_runs["bad toml"]
    assert run.returncode == 2, run
    assert len(run.stderr.splitlines()) == 1, run.stderr
    assert str(run.config) in run.stderr
    assert "Traceback" not in run.stderr


def test_check_good_config_exits_0_and_prints_the_watch(check_runs: dict[str, CliRun]) -> None:
    run = check_runs["good"]
    assert run.returncode == 0, run
    assert str(run.drop.resolve()) in run.stdout
    assert "Traceback" not in run.stderr


# --- the example config --------------------------------------------------------------------------


def _keys_by_section(text: str) -> dict[str, set[str]]:
    """Keys per table in the example, counting commented-out ``# key = …`` lines too."""
    sections: dict[str, set[str]] = {"": set()}
    current = ""
    for line in text.splitlines():
        header = re.match(r"^\s*#?\s*\[\[?\s*([A-Za-z_.]+)\s*\]\]?", line)
        if header:
            current = header.group(1)
            sections.setdefault(current, set())
            continue
        key = re.match(r"^\s*#?\s*([A-Za-z_]+)\s*=", line)
        if key:
            sections[current].add(key.group(1))
    return sections


def test_example_config_parses_and_has_every_key() -> None:
    example = ROOT / "config.example.toml"
    assert example.is_file(), "config.example.toml is missing at the repo root"
    text = example.read_text(encoding="utf-8")
    cfg = config.parse(tomllib.loads(text), source=example, text=text, check_paths=False)
    assert cfg.watches

    found = _keys_by_section(text)
    expected = {
        "api": set(checks.API_KEYS),
        "manifest": set(checks.MANIFEST_KEYS),
        "log": set(checks.LOG_KEYS),
        "metrics": set(checks.METRICS_KEYS),
        "watch": set(checks.WATCH_KEYS) - {"task"},
        "watch.task": set(checks.TASK_KEYS),
    }
    for section, keys in expected.items():
        missing = keys - found.get(section, set())
        assert not missing, f"config.example.toml [{section}] lacks {sorted(missing)}"
