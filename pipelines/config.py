"""One way to configure: dataclass defaults -> YAML recipe -> `key=value` overrides.

OmegaConf merges the three in struct mode, so a misspelt key fails loudly (with the closest valid
key), and building the dataclasses runs their `__post_init__` checks. Every problem becomes one
`UserError` line.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from app.errors import UserError
from app.evaluation import EvalConfig
from app.module import OptimConfig
from app.parallel import ParallelConfig
from app.tracking import TrackingConfig
from app.trainer import TrainerConfig
from moe import MoEConfig, RoutingKind, TransformerConfig
from pipelines.tokenize import DataConfig


@dataclass
class RunConfig:
    name: str = ""  # empty: <recipe>-<kind>-<hash of the config>; runs/<name>/ holds its files
    resume: bool = True  # continue from runs/<name>/checkpoints/last.ckpt when it exists
    root: str = "runs"

    def __post_init__(self) -> None:
        if self.name and (self.name in (".", "..") or any(c in self.name for c in "/\\\0") or self.name.startswith(".")):
            raise ValueError(f"run.name={self.name!r} must be a plain folder name (no '/', '\\', or leading '.')")


@dataclass
class ExperimentConfig:
    """The whole resolved configuration of a job; a checkpoint carries it."""

    model: TransformerConfig = field(default_factory=TransformerConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    run: RunConfig = field(default_factory=RunConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        if self.parallel.ep > 1 and self.moe.router.kind == RoutingKind.expert_choice:
            raise ValueError("expert_choice routing ranks tokens over the whole batch: it needs parallel.ep=1")
        if self.moe.num_experts % self.parallel.ep:
            raise ValueError(f"parallel.ep={self.parallel.ep} must divide moe.num_experts={self.moe.num_experts}")
        if (self.trainer.devices * self.parallel.num_nodes) % self.parallel.ep:
            raise ValueError(
                f"parallel.ep={self.parallel.ep} must divide the number of processes "
                f"(trainer.devices x parallel.num_nodes = {self.trainer.devices * self.parallel.num_nodes})"
            )
        if self.trainer.seq_len > self.model.max_seq_len:
            raise ValueError(
                f"trainer.seq_len={self.trainer.seq_len} exceeds model.max_seq_len={self.model.max_seq_len}"
            )


def load_config(path: str | Path | None, overrides: list[str] = (), schema: type = ExperimentConfig) -> Any:
    """Defaults of `schema`, then the YAML at `path` (if any), then `key=value` overrides."""
    layers = [_load_yaml(path)] if path else []
    return _merge(schema, [*layers, _parse_overrides(overrides)])


def config_from_yaml(text: str, overrides: list[str] = (), schema: type = ExperimentConfig) -> Any:
    """A resolved config saved as YAML text (a checkpoint's), validated like any other."""
    return _merge(schema, [OmegaConf.create(text), _parse_overrides(overrides)])


def _merge(schema: type, layers: list[DictConfig]) -> Any:
    base = OmegaConf.structured(schema)
    try:
        merged = OmegaConf.merge(base, *layers)
        return OmegaConf.to_object(merged)
    except ConfigKeyError as err:
        raise UserError(_unknown_key_message(err, base)) from None
    except OmegaConfBaseException as err:
        raise UserError(_bad_value_message(err, base)) from None
    except (ValueError, TypeError) as err:
        raise UserError(f"invalid config: {err}") from None


def to_yaml(config: Any) -> str:
    """The resolved config as YAML (what a run logs and a checkpoint carries)."""
    return OmegaConf.to_yaml(OmegaConf.structured(config))


def to_flat_dict(config: Any) -> dict[str, Any]:
    """{"moe.num_experts": 8, ...}: the resolved config as MLflow params."""
    container = OmegaConf.to_container(OmegaConf.structured(config), enum_to_str=True)
    return _flatten(container)


def _load_yaml(path: str | Path) -> DictConfig:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file not found: {path} (see conf/ for the recipes)")
    try:
        loaded = OmegaConf.load(path)
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise UserError(f"cannot parse {path} as YAML: {err.problem or err.context}{where}: "
                        "fix the file (conf/debug.yaml shows the format)") from None
    except Exception as err:  # other yaml.YAMLError, undecodable bytes: report, do not trace back
        raise UserError(f"cannot parse {path} as YAML ({_first_line(err)}): fix the file "
                        "(conf/debug.yaml shows the format)") from None
    if not isinstance(loaded, DictConfig):
        raise UserError(f"{path} must hold a mapping of config sections (model:, moe:, ...), not a list")
    return loaded


def _parse_overrides(overrides: list[str]) -> DictConfig:
    bad = [item for item in overrides if "=" not in item or item.startswith("=")]
    if bad:
        raise UserError(f"override {bad[0]!r} is not of the form key=value (e.g. moe.num_experts=16)")
    try:
        return OmegaConf.from_dotlist(list(overrides))
    except OmegaConfBaseException as err:
        raise UserError(f"cannot parse overrides {list(overrides)}: {_first_line(err)}") from None


def _bad_value_message(err: OmegaConfBaseException, base: DictConfig) -> str:
    """OmegaConf's reason, then what the key takes, shown with its default."""
    key = str(err.full_key or "")
    if not key:  # e.g. `model: 5` in a YAML file
        return f"invalid config: {_first_line(err)}: a section (model:, moe:, ...) holds keys, not a value"
    default = _flatten(OmegaConf.to_container(base, enum_to_str=True)).get(key)
    if isinstance(default, bool):
        example = str(default).lower()
    elif isinstance(default, list):
        example = f"[{','.join(map(str, default))}]"
    else:
        example = default
    hint = f": e.g. {key}={example} (the default)" if example not in (None, "") else ""
    return f"bad config value for '{key}': {_first_line(err).rstrip('.')}{hint}"


def _unknown_key_message(err: ConfigKeyError, base: DictConfig) -> str:
    key = str(err.full_key or getattr(err, "key", ""))
    valid = list(_flatten(OmegaConf.to_container(base, enum_to_str=True)))
    valid += sorted({k.rsplit(".", 1)[0] for k in valid if "." in k})
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    hint = f" (did you mean '{close[0]}'?)" if close else " (run `make info` to see the valid keys)"
    return f"unknown config key '{key}'{hint}"


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _first_line(err: BaseException) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
