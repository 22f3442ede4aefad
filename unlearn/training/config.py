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

from unlearn.core.errors import UserError, shown
from unlearn.core.files import MAX_DEPTH, read_text
from unlearn.core.registry import registry_of
from unlearn.core.settings import (
    AT_LEAST_ONE,
    NON_NEGATIVE,
    SEED,
    InvalidSettings,
    Limit,
    SettingError,
    check_value,
    from_mapping,
    key_list,
    setting,
    unknown_keys,
)
from unlearn.storage.runs import check_name
from unlearn.storage.tracking import REPORT_TO
from unlearn.training.stopping import StopRule


def _config_dir() -> Path:
    """configs/: package data (unlearn/configs) in an installed wheel, the top-level folder in a source checkout
    (an editable install reads it in place, so edits to the YAML files take effect at once)."""
    package = Path(__file__).resolve().parents[1]  # unlearn/, this file being unlearn/training/config.py
    packaged = package / "configs"
    return packaged if packaged.is_dir() else package.parent / "configs"


CONFIG_DIR = _config_dir()


# Values a YAML document may expand to once its aliases are followed: a config holds hundreds; a 400-byte "billion
# laughs" file (aliases of aliases) holds 10^9 and exhausts memory when anything walks it.
MAX_YAML_VALUES = 100_000
MAX_KEY_PARTS = 16  # of a dotted --set key (settings nest 3 deep)


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads `1e-5` as a string (it wants `1.0e-5`); learning rates are written the
    short way, so floats in scientific notation without a dot are resolved as floats too.
    Documents are checked before they become Python objects: aliases may not expand past MAX_YAML_VALUES values
    nor refer to themselves, and nesting may not pass MAX_DEPTH."""

    def get_single_data(self):  # noqa: ANN201 - PyYAML's signature
        node = self.get_single_node()
        if node is None:
            return None
        _check_expansion(node)
        return self.construct_document(node)


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


class _TooBig(yaml.YAMLError):
    pass


def _check_expansion(root: yaml.Node) -> None:
    """Count the values `root` stands for with every alias followed, and its depth, without expanding anything
    (each node is counted once and its total reused) and without recursion."""
    size: dict[int, int] = {}
    depth: dict[int, int] = {}
    open_: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, done = stack.pop()
        key = id(node)
        children = _children(node)
        if done:
            open_.discard(key)
            size[key] = 1 + sum(size[id(c)] for c in children)
            depth[key] = 1 + max((depth[id(c)] for c in children), default=0)
            if size[key] > MAX_YAML_VALUES:
                raise _TooBig(f"its aliases expand to more than {MAX_YAML_VALUES:,} values")
            if depth[key] > MAX_DEPTH:
                raise _TooBig(f"it nests deeper than {MAX_DEPTH} levels")
            continue
        if key in size:
            continue
        if key in open_:
            raise _TooBig("an alias refers to the value that contains it")
        open_.add(key)
        stack.append((node, True))
        stack.extend((c, False) for c in children if id(c) not in size)
    return None


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    return []


def parse_yaml(text: str):
    """YAML text as Python values, bounded (see _Loader); raises yaml.YAMLError for anything refused."""
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass
    except RecursionError:
        raise _TooBig(f"it nests deeper than {MAX_DEPTH} levels") from None


EVAL_ENGINES = ("lm-eval", "native")
PARALLEL = ("data", "fsdp")


@dataclass
class TrainConfig:
    max_steps: int = setting(60, limit=AT_LEAST_ONE)
    batch_size: int = setting(8, limit=AT_LEAST_ONE)
    seed: int = setting(0, limit=SEED)
    lora_rank: int = setting(0, limit=NON_NEGATIVE)  # > 0: train LoRA adapters of this rank, not the weights
    # Micro-batches per step: batch_size rows are split into grad_accum x processes equal shards, so the same
    # batch_size gives the same steps on one process or eight (see unlearn/training/loop.py).
    grad_accum: int = setting(1, limit=AT_LEAST_ONE)
    gradient_checkpointing: bool = False  # recompute each decoder layer's activations in backward: less memory
    max_length: int | None = setting(None, limit=AT_LEAST_ONE)  # tokens per training text; None: the benchmark's
    device: str = "auto"  # auto | cpu | cuda | cuda:N (checked by unlearn.compute.placement)
    dtype: str = "auto"  # compute precision: auto | bf16 | fp16 | fp32 (auto: bf16 on a GPU that has it, else fp32)
    # What updates are added to in bf16/fp16 (unlearn.compute.placement): auto | master (fp32 weights, autocast) | lean
    # (bf16 weights, stochastically rounded updates) | pure (rounded to nearest: lr-sized steps vanish).
    precision: str = "auto"
    # The guard: a run stops when, over its last 5 updates, at least this share of the trained weights it samples
    # was left bit-unchanged (updates rounding away); None turns it off.
    max_unchanged: float | None = setting(0.5, limit=Limit(gt=0, le=1))
    save_dtype: str | None = None  # precision of the saved model; None: the one it trained in
    save_every: int = setting(0, limit=NON_NEGATIVE)  # > 0: checkpoint every N steps, so --resume can continue
    # > 0: measure the benchmark's quick probe (forget and utility metrics) every N steps, outside the timed region,
    # into log.jsonl; with stop_at ('forget/mcq_acc <= 0.30') the run ends at the first measurement that meets it.
    eval_every: int = setting(0, limit=NON_NEGATIVE)
    eval_delay: int = setting(0, limit=NON_NEGATIVE)  # no measurement before this step (they cost time)
    stop_at: str | None = None
    # Under a launcher: "data" (every rank holds the model) or "fsdp" (parameters sharded across ranks; AdamW/SGD).
    parallel: str = setting("data", limit=Limit(choices=PARALLEL))


@dataclass
class EvalConfig:
    batch_size: int = setting(64, limit=AT_LEAST_ONE)
    # Padded tokens per scoring batch (rows x longest row): long texts get fewer rows, short ones more.
    # None: rows are limited by batch_size alone. The default is measured (unlearn/perf/eval_speed.py).
    max_batch_tokens: int | None = setting(2048, limit=AT_LEAST_ONE)
    max_new_tokens: int = setting(16, limit=AT_LEAST_ONE)
    # How WMDP/MMLU-style MCQs are scored: "lm-eval" (lm-eval-harness, the reference) or "native" (the
    # toolkit's in-loop scorer; a test shows both give the same accuracy).
    engine: str = "lm-eval"  # checked by check_engine, whose message names the engines
    openqa: bool = False  # also ask the MCQs open-ended and judge the free-text answers
    rouge: bool = True  # embedded: ROUGE-L of greedy answers (false: MCQ metrics and perplexity only, ~2x faster)
    judge: str | None = None  # NLI model (hub id or folder) judging open-ended answers; None: normalized match
    # A run is flagged collapsed when a utility metric falls below chance or its perplexity exceeds this many
    # times the starting model's (unlearn/evaluation/collapse.py).
    collapse_ratio: float = setting(10.0, limit=Limit(gt=1))


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
    # Where live curves go besides log.jsonl (Hugging Face's name and values; unlearn.storage.tracking). Top level
    # like output_dir and name: it says where a run is recorded, never what it computes.
    report_to: str = "none"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def method_options(self) -> dict[str, Any]:
        return {k: v for k, v in self.method.items() if k != "name"}

    @property
    def optimizer_options(self) -> dict[str, Any]:
        return {k: v for k, v in self.optimizer.items() if k != "name"}


def read_yaml(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise UserError(f"config file {path} does not exist")
    text = read_text(path, "config file")
    try:
        data = parse_yaml(text)
    except _TooBig as err:
        raise UserError(f"config file {path} is refused: {err}") from None
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
        raise UserError(f"--set expects key.path=value, got {shown(assignment)}")
    parts = key.strip().split(".")
    if len(parts) > MAX_KEY_PARTS:
        raise UserError(f"--set {shown(key)}: a key has at most {MAX_KEY_PARTS} parts, this one {len(parts)}")
    try:
        value = parse_yaml(text)
    except _TooBig as err:
        raise UserError(f"--set {shown(key)}: value refused: {err}") from None
    except yaml.YAMLError:
        raise UserError(f"--set {shown(key)}: cannot parse value {shown(text)}") from None
    set_path(raw, key.strip(), value, where=f"--set {shown(key)}")


def set_path(raw: dict[str, Any], key: str, value: Any, where: str | None = None) -> None:
    """raw["train"]["max_steps"] = value for key `train.max_steps`, creating the sections on the way."""
    node = raw
    *parents, leaf = key.split(".")
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise UserError(f"{where or key}: '{part}' is not a section")
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


def defaults_files(kind: str) -> dict[str, Path]:
    """Component name -> its defaults file, from a listing of configs/<kind>/: a name is looked up here, never
    joined into a path (`--method ../../x` would otherwise read any YAML file on disk)."""
    folder = CONFIG_DIR / kind
    return {p.stem: p for p in sorted(folder.glob("*.yaml")) if p.is_file()} if folder.is_dir() else {}


def component_defaults(kind: str, name: str) -> dict[str, Any]:
    """configs/<kind>/<name>.yaml for the component `name` names (an alias: its canonical name's), or {} when it
    has none; an unknown name is the registry's to report."""
    registry = registry_of(kind)
    if registry is not None and name in registry:
        name = registry.canonical(name)
    path = defaults_files(kind).get(name) if isinstance(name, str) else None
    return read_yaml(path) if path is not None else {}


def _component(kind: str, name: str | None, *layers: dict[str, Any]) -> dict[str, Any]:
    """method/optimizer section: that name's YAML defaults, then each layer's options on top.
    A layer naming a different component (e.g. run.yaml's default) contributes nothing."""
    chosen = _chosen(kind, name, *layers)
    out = {k: v for k, v in component_defaults(kind, chosen).items() if k != "run"}
    for section in _sections(kind, layers):
        if section.get("name") in (None, chosen):
            out = merge(out, {k: v for k, v in section.items() if k != "name"})
    return {**out, "name": chosen}


def _recipe(kind: str, name: str) -> dict[str, Any]:
    recipe = component_defaults(kind, name).get("run") or {}
    if not isinstance(recipe, dict):
        raise UserError(f"the 'run' section of configs/{kind}/{name}.yaml must be a mapping")
    return recipe


def check_engine(engine: str) -> None:
    if engine not in EVAL_ENGINES:
        raise UserError(f"unknown eval.engine {shown(engine)}; choose from: {', '.join(EVAL_ENGINES)}")


def eval_config(data: Any) -> EvalConfig:
    """The `eval` section as EvalConfig: unknown keys, types and ranges checked (also for a saved run's config)."""
    settings = from_mapping(EvalConfig, data, "eval")
    check_engine(settings.engine)
    if settings.judge is not None and not settings.judge.strip():
        raise UserError("eval.judge must name an NLI model (hub id or folder), or be null")
    return settings


def train_config(data: Any) -> TrainConfig:
    """The `train` section as TrainConfig: unknown keys, types, ranges and the placement's spellings checked."""
    from unlearn.compute.placement import check

    settings = from_mapping(TrainConfig, data, "train")
    check(settings.device, settings.dtype, settings.save_dtype, section="train", precision=settings.precision)
    if settings.stop_at is not None:
        StopRule.parse(settings.stop_at)
        if not settings.eval_every:
            raise UserError("train.stop_at is checked at the measurements train.eval_every makes: set "
                            "train.eval_every > 0 (e.g. 5)")
    return settings


# Facts a run records in its config.yaml beside the settings (reading such a file back ignores them).
RECORDED_KEYS = ("target_model",)
REMOTE_CODE_KEY = "trust_remote_code"


def _refuse_remote_code(layers: dict[str, dict[str, Any]]) -> None:
    """Remote code runs only when the user types --trust-remote-code: never because a config (perhaps one
    received with a run folder) says so. A saved `trust_remote_code: false` (older run configs) is harmless."""
    for where, layer in layers.items():
        if layer.pop(REMOTE_CODE_KEY, False) not in (False, None):
            raise UserError(f"{REMOTE_CODE_KEY} in {where} is refused: a model's own code runs only with the "
                            "--trust-remote-code flag on the command line")


def load_run_config(method: str | None = None, optimizer: str | None = None,
                    config_file: Path | None = None, flags: dict[str, Any] | None = None,
                    overrides: list[str] | None = None, benchmark: str | None = None,
                    layer: dict[str, Any] | None = None) -> RunConfig:
    """`layer`: settings given as a mapping (a study's cell), merged over the --config file at the same level."""
    raw = read_yaml(CONFIG_DIR / "run.yaml")
    user = read_yaml(config_file) if config_file is not None else {}
    user = merge(user, layer or {})
    for key in RECORDED_KEYS:
        user.pop(key, None)
    # Flags and --set go into their own layer so that they win over the chosen method's and
    # optimizer's YAML defaults, which are only known once the names are settled.
    cli: dict[str, Any] = {}
    for key, value in (flags or {}).items():
        if value is not None:
            apply_override(cli, f"{key}={yaml.safe_dump(value, default_flow_style=True).strip()}")
    for assignment in overrides or []:
        apply_override(cli, assignment)
    _refuse_remote_code({str(config_file) if config_file is not None else "the study's run settings": user,
                         "--set": cli})
    # A method or an optimizer may need different run settings (RMU: another learning rate and more steps; a
    # zeroth-order member: LoRA and many more steps); the `run:` section of its YAML sits right above run.yaml
    # (the optimizer's above the method's), below everything the user says.
    for kind, name in (("method", method), ("optimizer", optimizer)):
        raw = merge(raw, _recipe(kind, _chosen(kind, name, raw, user, cli)))
    raw = merge(raw, user)
    components = {kind: _component(kind, chosen, raw, cli)
                  for kind, chosen in (("method", method), ("optimizer", optimizer), ("benchmark", benchmark))}
    raw = merge(raw, cli)
    raw.update(components)
    known = {f.name for f in fields(RunConfig)}
    unknown = unknown_keys(raw, known)
    if unknown:
        raise UserError(f"unknown top-level config key(s): {key_list(unknown)}")
    raw["train"] = train_config(raw.get("train"))
    raw["eval"] = eval_config(raw.get("eval"))
    try:
        raw["report_to"] = check_value("report_to", raw.get("report_to", "none"), str, Limit(choices=REPORT_TO))
    except SettingError as err:
        raise InvalidSettings(str(err)) from None
    for key in ("model", "benchmark"):
        if key not in raw:
            raise UserError(f"config has no '{key}'")
    for key in ("model", "output_dir"):
        if not isinstance(raw.get(key), str) or not raw[key].strip() or "\0" in raw[key]:
            raise UserError(f"config '{key}' must be a non-empty string (a path or hub id), got {shown(raw.get(key))}")
    if raw.get("name") is not None:
        check_name(raw["name"])
    return RunConfig(**raw)
