"""A run's whole configuration: YAML presets + `--set key=value` overrides -> `PipelineConfig`
(tasks/pipeline_config.py).

Reading presets and overrides needs no stage: `tok1d presets` lists them without importing the
stage modules; `load_config` imports them to validate the result (they import no torch: what a
stage computes is imported when it runs, tests/flows/test_cli_fast.py checks it).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from pydantic import ValidationError

from tasks.config import ConfigError
from tasks.registry import STAGE_ORDER, get_stage

if TYPE_CHECKING:
    from tasks.pipeline_config import PipelineConfig

CONFIGS_DIR = Path(__file__).resolve().parent.parent / "configs"


def available_presets() -> dict[str, str]:
    """Preset name -> description, for `tok1d presets`."""
    presets = {}
    for path in sorted(CONFIGS_DIR.glob("*.yaml")):
        raw = yaml.safe_load(path.read_text()) or {}
        presets[path.stem] = raw.get("description", "")
    return presets


def _yaml_problem(error: yaml.YAMLError) -> str:
    """PyYAML's problem and position in one line ("mapping values are not allowed here, line 2 column 6")."""
    mark = getattr(error, "problem_mark", None)
    problem = getattr(error, "problem", None) or str(error).splitlines()[0]
    return f"{problem}, line {mark.line + 1} column {mark.column + 1}" if mark is not None else problem


def _load_raw(name_or_path: str, seen: tuple[str, ...] = ()) -> dict[str, Any]:
    path = Path(name_or_path)
    if not path.suffix:
        path = CONFIGS_DIR / f"{name_or_path}.yaml"
    if not path.exists():
        known = ", ".join(available_presets())
        raise ConfigError(f"unknown preset {name_or_path!r}: no file {path} (known presets: {known})")
    if str(path) in seen:
        raise ConfigError(f"preset {path} extends itself through {' -> '.join(seen)}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"preset {path}: malformed YAML: {_yaml_problem(error)}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"preset {path} must be a YAML mapping")
    parent = raw.pop("extends", None)
    if parent is None:
        return raw
    base = _load_raw(parent, (*seen, str(path)))
    return _deep_merge(base, raw)


def _deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b.c=value` -> (["a", "b", "c"], typed value). Values are parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key.path=value")
    key, raw_value = text.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r} has an empty key part")
    try:
        value = yaml.safe_load(raw_value) if raw_value.strip() else ""
    except yaml.YAMLError as error:
        raise ConfigError(f"override {text!r}: the value is not valid YAML: {_yaml_problem(error)}") from None
    if isinstance(value, str):
        # YAML 1.1 reads "1e-4" as a string; users mean a number.
        try:
            value = float(value) if any(c in value for c in ".eE") else value
        except ValueError:
            pass
    # Stage names use dashes (embed-text); their config sections use underscores.
    parts = key.split(".")
    parts[0] = parts[0].replace("-", "_")
    return parts, value


def apply_override(raw: dict[str, Any], path: list[str], value: Any) -> None:
    node = raw
    for depth, part in enumerate(path[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"--set {'.'.join(path)}: {'.'.join(path[: depth + 1])} is not a section")
        node = child
    node[path[-1]] = value


def _describe(error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        key = ".".join(str(part) for part in item["loc"])
        if item["type"] == "extra_forbidden":
            lines.append(f"{key}: unknown key")
        elif item["type"] == "missing":
            lines.append(f"{key}: required key is missing")
        else:
            lines.append(f"{key}: {item['msg']} (got {item.get('input')!r})")
    return "; ".join(lines)


def load_config(preset: str = "default", overrides: list[str] | tuple[str, ...] = ()) -> PipelineConfig:
    """Load a preset (name in configs/ or a YAML path), apply overrides, validate."""
    # The stages' sections and plug-in checks come with their modules (pyarrow, their plug-in
    # tables): imported here, not with this module, so that reading presets stays light.
    from tasks.pipeline_config import PipelineConfig

    raw = _load_raw(preset)
    raw.setdefault("name", Path(preset).stem)
    for text in overrides:
        path, value = parse_override(text)
        apply_override(raw, path, value)
    try:
        config = PipelineConfig.model_validate(raw)
    except ValidationError as error:
        raise ConfigError(f"invalid configuration for preset {preset!r}: {_describe(error)}") from None
    for name in STAGE_ORDER:
        stage = get_stage(name)
        if stage.check is not None:
            try:
                stage.check(config.section(name))
            except ValueError as error:
                raise ConfigError(f"invalid configuration for preset {preset!r}: {error}") from None
    return config
