"""The fake API's fault injection: what goes wrong, how often, and its command-line flags.

Users can try their setup against the same faults the reliability tests inject.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

_RATES = ("rate_503", "rate_429", "rate_reset", "rate_bad_json")


@dataclass
class Faults:
    """What goes wrong, and how often. Defaults: nothing. Random faults hit POST /file only.

    `retry_after_s` is sent as Retry-After on 429: whole seconds as an integer (RFC 9110), a
    fraction as a decimal ("0.2"), which RFC clients reject but lets tests stay fast.
    `script` holds status codes (400-599) the next uploads get, one each, before any random
    fault: 0 drops the connection, 200 means "answer normally".
    """

    rate_503: float = 0.0
    rate_429: float = 0.0
    retry_after_s: float = 1.0
    rate_reset: float = 0.0
    delay_s: float = 0.0
    reject_pattern: str = ""
    reject_key: bool = False
    rate_bad_json: float = 0.0
    script: list[int] = field(default_factory=list)
    seed: int | None = None

    def __post_init__(self) -> None:
        self.update({f.name: getattr(self, f.name) for f in dataclasses.fields(self)})

    def update(self, changes: Mapping[str, Any]) -> None:
        """Apply `changes` all or nothing; ValueError names an unknown field or a bad value."""
        known = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise ValueError(f"unknown fault field: {', '.join(unknown)}")
        checked = {name: _check_fault(name, value) for name, value in changes.items()}
        for name, value in checked.items():
            setattr(self, name, value)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _check_fault(name: str, value: Any) -> Any:
    if name in (*_RATES, "retry_after_s", "delay_s"):
        if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
            raise ValueError(f"{name} must be a number >= 0")
        if name in _RATES and value > 1:
            raise ValueError(f"{name} must be between 0 and 1")
        return float(value)
    if name == "reject_pattern" and isinstance(value, str):
        return value
    if name == "reject_key" and isinstance(value, bool):
        return value
    if name == "seed" and (value is None or type(value) is int):
        return value
    if name == "script" and isinstance(value, list):
        if all(type(c) is int and (c in (0, 200) or 400 <= c <= 599) for c in value):
            return list(value)  # a copy: uploads pop from it
        raise ValueError("script must be a list of 400-599, 200 (normal) or 0 (a reset)")
    raise ValueError(f"{name}: wrong type {type(value).__name__}")


def add_fault_arguments(parser: argparse.ArgumentParser) -> None:
    faults = parser.add_argument_group("fault injection (random faults hit POST /file only)")
    for name, what in (
        ("rate_503", "share of uploads answered 503"),
        ("rate_429", "share of uploads answered 429 with Retry-After"),
        ("retry_after_s", "Retry-After sent with 429, in seconds (default 1)"),
        ("rate_reset", "share of uploads whose connection is dropped mid-body"),
        ("delay_s", "answer every request this many seconds later"),
        ("rate_bad_json", "share of uploads answered 200 with a body that is not the API's"),
    ):
        faults.add_argument(f"--{name.replace('_', '-')}", type=float, default=None, help=what)
    faults.add_argument("--reject-pattern", default=None, help="glob: reject these file names")
    faults.add_argument("--reject-key", action="store_true", help="answer 401 to every request")
    faults.add_argument(
        "--script", type=parse_script, default=None, metavar="CODES",
        help="statuses the next uploads get, e.g. 503,429 (0: drop the connection)",
    )  # fmt: skip
    faults.add_argument("--seed", type=int, default=None, help="seed for reproducible faults")


def faults_from_args(args: argparse.Namespace) -> Faults:
    """The faults given on the command line; ValueError for an out-of-range value."""
    names = [f.name for f in dataclasses.fields(Faults)]
    return Faults(**{n: v for n in names if (v := getattr(args, n, None)) is not None})


def parse_script(text: str) -> list[int]:
    try:
        return [int(code) for code in text.split(",") if code.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError("expected status codes separated by commas") from None
