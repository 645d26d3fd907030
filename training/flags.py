"""Command-line flags for the training scripts: one ``--flag`` per field of a frozen config dataclass.

Example:
    >>> from dataclasses import dataclass
    >>> @dataclass(frozen=True)
    ... class Config:
    ...     steps: int = 10
    ...     lr: float = 1e-3
    >>> parse_config(Config, ["--steps", "20"], "demo")
    Config(steps=20, lr=0.001)
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import MISSING, fields
from typing import Any, TypeVar

ConfigT = TypeVar("ConfigT")


def parse_config(config_type: type[ConfigT], argv: Sequence[str] | None, description: str | None) -> ConfigT:
    """Build ``config_type`` from flags named after its fields (``snake_case`` -> ``--kebab-case``).

    Each flag takes the type and default of its field's default value; fields must have defaults of
    type int, float or str.
    """
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    for field in fields(config_type):  # type: ignore[arg-type]
        default: Any = field.default
        if default is MISSING or type(default) not in (int, float, str):
            raise TypeError(f"{config_type.__name__}.{field.name} needs an int, float or str default for its flag")
        parser.add_argument(f"--{field.name.replace('_', '-')}", type=type(default), default=default)
    return config_type(**vars(parser.parse_args(argv)))
