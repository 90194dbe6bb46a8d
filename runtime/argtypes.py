"""argparse value types shared by the CLI and the options' argparse helper: each refuses a bad value in
one line naming it."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be more than 0, got {text}")
    return value


def path_or_uri(text: str) -> Path | str:
    """A local path, or a URI (s3://, gs://, file://...) kept as written: Path would fold its '//'."""
    return text if "://" in text else Path(text)


def csv_list(choices: tuple[str, ...] | None = None):
    def parse(text: str) -> list[str]:
        items = [x.strip() for x in text.split(",") if x.strip()]
        bad = [x for x in items if choices is not None and x not in choices]
        if not items or bad:
            raise argparse.ArgumentTypeError(f"choose from {', '.join(choices or ())}; got {text!r}")
        return list(dict.fromkeys(items))
    return parse


def option_value(text: str) -> Any:
    """A backend option's value as written: true/false, a whole number, else the text."""
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    try:
        return int(text)
    except ValueError:
        return text


def option_pair(text: str) -> tuple[str, Any]:
    """`key=value` as (key, option_value(value)); ValueError names a malformed one."""
    key, eq, value = text.partition("=")
    if not eq or not key.strip():
        raise ValueError(f"backend option {text!r} is not option=value")
    return key.strip(), option_value(value.strip())


def backend_option(text: str) -> tuple[str, Any]:
    try:
        return option_pair(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
