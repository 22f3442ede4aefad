"""Run configuration: YAML files in configs/ merged in a fixed order, then dotted overrides.

Precedence (later wins): configs/run.yaml < configs/{method,optimizer,benchmark}/<name>.yaml
< the user's --config file < command-line flags < --set key.path=value. A section that names another
component (run.yaml's default benchmark when --benchmark picks a different one) contributes nothing.
The fully resolved result is written to runs/<name>/config.yaml, so a run can be reproduced
from that one file.
"""

from __future__ import annotations

import copy
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from unlearn.errors import UserError

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads `1e-5` as a string (it wants `1.0e-5`); learning rates are written the
    short way, so floats in scientific notation without a dot are resolved as floats too."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def parse_yaml(text: str):
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


@dataclass
class TrainConfig:
    max_steps: int = 60
    batch_size: int = 8
    seed: int = 0
    lora_rank: int = 0  # > 0: train LoRA adapters of this rank instead of the weights themselves


@dataclass
class EvalConfig:
    batch_size: int = 64
    max_new_tokens: int = 16
    # How WMDP/MMLU-style MCQs are scored: "lm-eval" (lm-eval-harness, the reference) or "native" (the
    # toolkit's in-loop scorer; a test shows both give the same accuracy).
    engine: str = "lm-eval"
    openqa: bool = False  # also ask the MCQs open-ended and judge the free-text answers
    judge: str | None = None  # NLI model (hub id or folder) judging open-ended answers; None: normalized match


@dataclass
class RunConfig:
    model: str
    method: dict[str, Any]  # {"name": ..., **options}
    optimizer: dict[str, Any]
    benchmark: dict[str, Any]
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    output_dir: str = "runs"
    name: str | None = None
    trust_remote_code: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def method_options(self) -> dict[str, Any]:
        return {k: v for k, v in self.method.items() if k != "name"}

    @property
    def optimizer_options(self) -> dict[str, Any]:
        return {k: v for k, v in self.optimizer.items() if k != "name"}


def read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise UserError(f"config file {path} does not exist")
    try:
        data = parse_yaml(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise UserError(f"malformed YAML in {path}{where}: {getattr(err, 'problem', err)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"config file {path} must hold a mapping at the top level, got {type(data).__name__}")
    return data


def merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Deep merge: nested mappings merge key by key, everything else replaces."""
    out = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def apply_override(raw: dict[str, Any], assignment: str) -> None:
    """`train.max_steps=100` -> raw["train"]["max_steps"] = 100 (value parsed as YAML)."""
    key, sep, text = assignment.partition("=")
    if not sep or not key.strip():
        raise UserError(f"--set expects key.path=value, got '{assignment}'")
    try:
        value = parse_yaml(text)
    except yaml.YAMLError:
        raise UserError(f"--set {key}: cannot parse value '{text}'") from None
    node = raw
    *parents, leaf = key.strip().split(".")
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise UserError(f"--set {key}: '{part}' is not a section")
        node = child
    node[leaf] = value


def _sections(kind: str, layers: tuple[dict[str, Any], ...]) -> list[dict[str, Any]]:
    sections = []
    for layer in layers:
        section = layer.get(kind) or {}
        if isinstance(section, str):
            section = {"name": section}
        if not isinstance(section, dict):
            raise UserError(f"config '{kind}' must be a name or a mapping")
        sections.append(section)
    return sections


def _chosen(kind: str, name: str | None, *layers: dict[str, Any]) -> str:
    """The component name: the explicit flag, else the last layer that names one."""
    chosen = name or next((s["name"] for s in reversed(_sections(kind, layers)) if s.get("name")), None)
    if not chosen:
        raise UserError(f"no {kind} given: pass --{kind} NAME")
    return chosen


def _defaults(kind: str, name: str) -> dict[str, Any]:
    path = CONFIG_DIR / kind / f"{name}.yaml"
    return read_yaml(path) if path.is_file() else {}


def _component(kind: str, name: str | None, *layers: dict[str, Any]) -> dict[str, Any]:
    """method/optimizer section: that name's YAML defaults, then each layer's options on top.
    A layer naming a different component (e.g. run.yaml's default) contributes nothing."""
    chosen = _chosen(kind, name, *layers)
    out = {k: v for k, v in _defaults(kind, chosen).items() if k != "run"}
    for section in _sections(kind, layers):
        if section.get("name") in (None, chosen):
            out = merge(out, {k: v for k, v in section.items() if k != "name"})
    return {**out, "name": chosen}


def _dataclass(cls, data: Any, section: str):
    if not isinstance(data, dict):
        raise UserError(f"config section '{section}' must be a mapping")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise UserError(f"unknown key(s) in '{section}': {', '.join(unknown)} (known: {', '.join(sorted(known))})")
    return cls(**data)


EVAL_ENGINES = ("lm-eval", "native")


def check_engine(engine: str) -> None:
    if engine not in EVAL_ENGINES:
        raise UserError(f"unknown eval.engine '{engine}'; choose from: {', '.join(EVAL_ENGINES)}")


def eval_config(data: Any) -> EvalConfig:
    """The `eval` section as EvalConfig, rejecting unknown keys and engines (also for a saved run's config)."""
    settings = _dataclass(EvalConfig, data if data is not None else {}, "eval")
    check_engine(settings.engine)
    return settings


def load_run_config(method: str | None = None, optimizer: str | None = None,
                    config_file: Path | None = None, flags: dict[str, Any] | None = None,
                    overrides: list[str] | None = None, benchmark: str | None = None) -> RunConfig:
    raw = read_yaml(CONFIG_DIR / "run.yaml")
    user = read_yaml(config_file) if config_file is not None else {}
    # Flags and --set go into their own layer so that they win over the chosen method's and
    # optimizer's YAML defaults, which are only known once the names are settled.
    cli: dict[str, Any] = {}
    for key, value in (flags or {}).items():
        if value is not None:
            apply_override(cli, f"{key}={yaml.safe_dump(value, default_flow_style=True).strip()}")
    for assignment in overrides or []:
        apply_override(cli, assignment)
    # A method may need different run settings (RMU: another learning rate and more steps); its YAML's
    # `run:` section sits right above run.yaml, below everything the user says.
    recipe = _defaults("method", _chosen("method", method, raw, user, cli)).get("run") or {}
    if not isinstance(recipe, dict):
        raise UserError(f"the 'run' section of configs/method/{_chosen('method', method, raw, user, cli)}.yaml "
                        "must be a mapping")
    raw = merge(merge(raw, recipe), user)
    components = {kind: _component(kind, chosen, raw, cli)
                  for kind, chosen in (("method", method), ("optimizer", optimizer), ("benchmark", benchmark))}
    raw = merge(raw, cli)
    raw.update(components)
    known = {f.name for f in fields(RunConfig)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise UserError(f"unknown top-level config key(s): {', '.join(unknown)}")
    raw["train"] = _dataclass(TrainConfig, raw.get("train", {}), "train")
    raw["eval"] = eval_config(raw.get("eval", {}))
    for key in ("model", "benchmark"):
        if key not in raw:
            raise UserError(f"config has no '{key}'")
    return RunConfig(**raw)
