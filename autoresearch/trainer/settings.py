"""Where the workload's settings come from: autoresearch.toml [workload], the environment."""

from __future__ import annotations

import math
import os
import tomllib
from dataclasses import dataclass
from pathlib import Path

from autoresearch.errors import ConfigError
from autoresearch.trainer import PROFILES, detect_profile

DATA_KINDS = ("stdlib", "climbmix", "tinystories")  # plus "dir:/abs/path"


@dataclass(frozen=True)
class Settings:
    profile: str
    data: str  # "stdlib" | "dir:/abs/path" | "climbmix" | "tinystories"
    data_url: str = ""  # optional base URL for downloaded corpora

    @property
    def constants(self) -> dict:
        return PROFILES[self.profile]


def read_settings(workspace: Path | None = None) -> Settings:
    """Read [workload] from `workspace`/autoresearch.toml (default: the current directory)."""
    path = Path(workspace or Path.cwd()) / "autoresearch.toml"
    table: dict = {}
    if path.is_file():
        try:
            table = tomllib.loads(path.read_text(encoding="utf-8")).get("workload", {})
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path}: {exc}") from None
        if not isinstance(table, dict):
            raise ConfigError(f"{path}: [workload] must be a table")
    for key in ("profile", "data", "data_url"):
        if key in table and not isinstance(table[key], str):
            raise ConfigError(f"{path}: workload.{key} must be a string")
    profile = table.get("profile") or detect_profile()
    if profile not in PROFILES:
        raise ConfigError(f"{path}: workload.profile {profile!r} is not one of: {', '.join(PROFILES)}")
    data = table.get("data") or "stdlib"
    if data.startswith("dir:"):
        if not os.path.isabs(data[4:]):
            raise ConfigError(f"{path}: workload.data {data!r}: the directory must be an absolute path")
    elif data not in DATA_KINDS:
        raise ConfigError(
            f"{path}: workload.data {data!r} is not one of: stdlib, dir:/abs/path, climbmix, tinystories"
        )
    return Settings(profile=profile, data=data, data_url=table.get("data_url", "").rstrip("/"))


def cache_dir() -> Path:
    """$AUTORESEARCH_CACHE_DIR, else $XDG_CACHE_HOME/autoresearch, else ~/.cache/autoresearch."""
    if os.environ.get("AUTORESEARCH_CACHE_DIR"):
        return Path(os.environ["AUTORESEARCH_CACHE_DIR"])
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]) / "autoresearch"
    return Path.home() / ".cache" / "autoresearch"


def budget_seconds(profile: str) -> float:
    """The profile's budget; AUTORESEARCH_TIME_BUDGET overrides it (tests only)."""
    override = os.environ.get("AUTORESEARCH_TIME_BUDGET")
    if override:
        try:
            value = float(override)
        except ValueError:
            value = math.nan
        if not (value > 0 and math.isfinite(value)):
            raise ConfigError(f"AUTORESEARCH_TIME_BUDGET={override!r} must be a positive number of seconds")
        return value
    return float(PROFILES[profile]["budget_seconds"])
