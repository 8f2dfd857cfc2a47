"""One typed configuration tree, loaded from YAML and ``--set key.sub=value`` overrides.

Every section is a frozen-free dataclass so defaults live in one place and a resolved config can be
written back out (``resolved_config.yaml``) next to every command's outputs. Loading is strict: an
unknown key or a value of the wrong type is a :class:`ConfigError` naming the dotted path.
"""

from __future__ import annotations

import dataclasses
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from dse.errors import ConfigError
from dse.fileio import atomic_write_text
from models.moe import DEFAULT_GATE

PROFILE_DIR_ENV = "DSE_PROFILE_DIR"
STORAGE_ENV = "DSE_STORAGE"  # a storage URL with a password need not be typed on a command line
# user:password@ in any URL of a text; SQLAlchemy's URL.render_as_string(hide_password=True) shows "***" too
_URL_PASSWORD = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://[^:/@\s]*:)[^@\s]*@")


def hide_password(text: str) -> str:
    """``text`` with the password of every URL in it replaced by ``***``: storage URLs are shown in errors
    and saved in run folders, which users share."""
    return _URL_PASSWORD.sub(r"\1***@", text)


@dataclass
class ModelConfig:
    name: str = "vit_digits"  # a registered name (models.names()) or any timm model name
    kwargs: dict[str, Any] = field(default_factory=dict)  # e.g. img_size, patch_size, depth
    num_classes: int = 10
    checkpoint: str | None = None  # dense pretrained weights; None: `dse pretrain` makes them


@dataclass
class DataConfig:
    name: Literal["digits", "imagefolder"] = "digits"
    path: str | None = None  # ImageFolder root holding train/ and val/
    img_size: int = 32
    val_fraction: float = 0.2  # digits only: seeded stratified split
    batch_size: int = 64
    eval_batch_size: int = 256
    workers: int = 0
    augment: bool = True


@dataclass
class TrainConfig:
    epochs: int = 60
    lr: float = 2e-3
    min_lr: float = 1e-5
    weight_decay: float = 0.05
    warmup_epochs: int = 3
    label_smoothing: float = 0.1
    grad_clip: float = 1.0
    threads: int = 0  # torch intra-op threads; 0 = all cores
    # Progressive resizing (Touvron et al., "Fixing the train-test resolution discrepancy", NeurIPS 2019):
    # the first `low_res_epochs` epochs at `low_res` px (same patches, fewer tokens: quadratic attention
    # makes them far cheaper), then the position embedding is resampled and `epochs` more run at data.img_size.
    low_res: int | None = None
    low_res_epochs: int = 0


@dataclass
class ProfileConfig:
    target: str = "cpu"  # cpu | cuda | cuda:sm_90 | a JSON target dict
    batch: int = 8
    trials: int = 0  # MetaSchedule trials per shape (0 = default schedules, persisted records still used)
    min_repeat_ms: float = 40.0
    repeat: int = 7
    energy: list[str] = field(default_factory=lambda: ["nvml", "rapl", "model"])  # tried in order
    energy_window_s: float = 0.5
    # Profile root: $DSE_PROFILE_DIR when set (a shared profile store, or a test's own), else ./profiles.
    dir: str = field(default_factory=lambda: os.environ.get(PROFILE_DIR_ENV) or "profiles")
    torch_threads: int = 2  # intra-op threads of the PyTorch baseline rows (0 = torch's default)
    nonprim: bool = True  # also profile the non-primitive work (norms, GELU, softmax, ...)
    passes: int = 1  # measure every row this many times, a whole run apart; a row keeps their median
    # a stored row measured while the 1-min load exceeded this per core is measured again, not reused (a host
    # that is never quieter can raise it; the profiler's own threads keep up to one per core busy)
    busy_load_per_core: float = 1.25
    # whole compiled models (random assignments and the corner designs) timed after the rows to fit the in-context
    # factors of dse.cost.calibration; 0 = no calibration (TVM targets this machine can run only)
    calibration_models: int = 6

    @property
    def tuning_dir(self) -> Path:
        """MetaSchedule records live beside the profiles they were measured for, never in the install."""
        return Path(self.dir) / "tuning"


@dataclass
class CostConfig:
    metric: Literal["latency", "energy", "mix"] = "latency"  # what weights the MoE balance loss
    mix_alpha: float = 0.5  # mix = alpha * latency_share + (1 - alpha) * energy_share
    strict: bool = False  # refuse MoE expert costs that are not all measured (regression, partial, cost table)
    holdout_shapes: int = 12  # `dse cost --validate`: random unprofiled shapes per kernel primitive and backend
    validate_runs: int = 30  # ... and at least this many eager runs (and 3 s) of the dense model, in all bursts
    validate_rounds: int = 3  # ... and rounds re-measuring its torch rows side by side with it; > 0 also re-measures
    # each primitive's rows before its held-out shapes (0 = neither: compare with the stored profile only)
    validate_assignments: int = 8  # ... and random assignments compiled whole and timed interleaved (0 = none)
    poison_factor: float = 1.5  # ... a profile row whose in-model/profiled ratio strays this far from the usual one
    # apply the profile's in-context factors for the model (dse.cost.calibration) to TVM predictions; false prices
    # the compiled model as the sum of its kernels and ops profiled alone
    calibrated: bool = True


@dataclass
class FinetuneConfig:
    # Measured on the embedded default (vit_digits, dense 96.94%): see dse/finetune.py's docstring.
    epochs: int = 12
    lr: float = 1e-3
    min_lr: float = 1e-5
    weight_decay: float = 0.05
    warmup_epochs: int = 1
    label_smoothing: float = 0.0
    kd_weight: float = 0.5  # loss = (1 - w) * CE + w * KD
    kd_temperature: float = 2.0
    moe_coef: float = 0.01  # the original's intended (never applied) coefficient
    grad_clip: float = 1.0
    assignment: str | None = None  # YAML; None = the ShiftAddViT recipe (hamming attention, moe Linears)
    profile: str | None = None  # profile CSV for the MoE expert costs; None = the store's for profile.target
    nbits: int = 16  # Hamming code bits per head
    weight_bits: int = 5  # shift weights: sign + exponent in [-(2^(b-1)-2), 0]
    frac_bits: int = 16  # fixed-point fraction bits of shift-layer activations
    gate: Literal["straight_through", "prob"] = DEFAULT_GATE  # MoE combine: the one default, in models/moe.py
    amp: Literal["off", "bf16", "fp16"] = "bf16"  # autocast on CUDA; CPU always trains in fp32
    threads: int = 0  # torch intra-op threads; 0 = all cores
    batch_size: int | None = 32  # training batch (None = data.batch_size): more steps per epoch


@dataclass
class SearchConfig:
    trials: int = 3000  # stage A (cost model only)
    sampler: Literal["nsga2", "tpe", "random"] = "nsga2"
    population: int = 100
    # any Optuna storage URL; default: $DSE_STORAGE, else sqlite in the output folder (saved without password)
    storage: str | None = field(default_factory=lambda: os.environ.get(STORAGE_ENV) or None)
    study_name: str = "shiftadd"
    freeze: list[str] = field(default_factory=list)  # layer-name globs kept as mult/msa
    tie: list[str] = field(default_factory=list)  # e.g. ["fc1", "fc2"]: one choice for all such layers
    stage_b_candidates: int = 4
    stage_b_epochs: int = 2
    latency_budget_ms: float | None = None
    energy_budget_mj: float | None = None
    max_accuracy_drop: float = 1.0  # points, for choosing best_assignment.yaml
    stage: Literal["a", "b", "both"] = "both"  # a: cost model + risk proxy only; b: fine-tune front candidates
    # Profile CSV(s) from any device (or a cost-table JSON); several: one latency objective per device.
    # None = the store's profile for this device and profile.target.
    profile: str | list[str] | None = None
    sensitivity_samples: int = 512  # validation images for the per-layer sensitivity proxy (0 = all)
    persist_every_s: float = 2.0  # stage A writes its in-memory trials to the storage at least this often


@dataclass
class ExportConfig:
    target: str = "cpu"
    cuda_arch: str | None = "sm_90"  # also produce a compile-only CUDA artifact; None to skip
    tune_trials: int = 0
    batch: int = 8  # the compiled graph is static: this many images per call (MoE capacity is per batch)
    profile: str | None = None  # profile CSV for the shift-kernel choice and the prediction; None: the store's
    val_images: int | None = None  # validation images for calibration and checks; None: all
    repeat: int = 30  # latency samples taken after export (target runnable here)
    threads: int = 0  # torch intra-op threads for the PyTorch passes (calibration, reference); 0 = all cores
    # auto: the faster kernel per shape; or matshift | matshift_decode everywhere; or {layer: primitive}
    shift_primitive: str | dict[str, str] = "auto"


@dataclass
class BenchConfig:
    batch: int = 8
    # calls per contestant, interleaved in rounds: on this shared 2-core host 30 gave medians that moved
    # by 10-15% from run to run, 200 by about 1%
    repeat: int = 200
    # ...at most: fewer where 200 would take longer than this (DeiT-Tiny's four contestants took 94-113 s)
    budget_s: float | None = 30.0
    warmup: int = 5
    torch_compile: bool = True
    # also time the dense checkpoint compiled by TVM (all-mult, built once next to the artifact): the
    # ShiftAddViT's speed-up over it is the reparameterisation's own gain, not the compiler's
    dense_tvm: bool = True
    threads: int = 0  # threads for both PyTorch and TVM; 0 = each runtime's default (all cores)


@dataclass
class Config:
    seed: int = 0
    out: str = "runs/default"
    device: str = "cpu"  # torch device for training
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    pretrain: TrainConfig = field(default_factory=TrainConfig)
    profile: ProfileConfig = field(default_factory=ProfileConfig)
    cost: CostConfig = field(default_factory=CostConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    bench: BenchConfig = field(default_factory=BenchConfig)


# ---------------------------------------------------------------------------------------------------
# Strict conversion from plain data


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{path}' must be a mapping of {tp.__name__} fields, got {value!r}")
        return _build(tp, value, path)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, path)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(f"config key '{path}' has invalid value {value!r} (expected {_type_name(tp)})")
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(f"config key '{path}' must be one of {', '.join(map(str, allowed))}; got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"config key '{path}' must be a list, got {value!r}")
        (item,) = typing.get_args(tp)
        return [_convert(v, item, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{path}' must be a mapping, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config key '{path}' must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config key '{path}' must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(f"config key '{path}' must be a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"config key '{path}' must be a number, got {value!r}")
        if value != value:  # NaN
            raise ConfigError(f"config key '{path}' must be a number, got NaN")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"config key '{path}' must be a string, got {value!r}")
        return value
    raise ConfigError(f"config key '{path}' has unsupported type {_type_name(tp)}")  # pragma: no cover


def _build(cls: type, data: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            raise ConfigError(f"unknown config key '{path}'; valid keys here: {', '.join(sorted(names))}")
        kwargs[key] = _convert(value, hints[key], path)
    return cls(**kwargs)


def _validate(cfg: Config) -> None:
    """Range checks that types alone cannot express."""
    positive = {
        "data.img_size": cfg.data.img_size,
        "data.batch_size": cfg.data.batch_size,
        "data.eval_batch_size": cfg.data.eval_batch_size,
        "model.num_classes": cfg.model.num_classes,
        "profile.batch": cfg.profile.batch,
        "profile.repeat": cfg.profile.repeat,
        "profile.passes": cfg.profile.passes,
        "profile.busy_load_per_core": cfg.profile.busy_load_per_core,
        "bench.batch": cfg.bench.batch,
        "export.batch": cfg.export.batch,
        "export.repeat": cfg.export.repeat,
        "bench.repeat": cfg.bench.repeat,
        "search.trials": cfg.search.trials,
        "search.population": cfg.search.population,
        "cost.holdout_shapes": cfg.cost.holdout_shapes,
    }
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"config key '{key}' must be positive, got {value}")
    non_negative = {
        "bench.threads": cfg.bench.threads,
        "export.threads": cfg.export.threads,
        "pretrain.epochs": cfg.pretrain.epochs,
        "pretrain.low_res_epochs": cfg.pretrain.low_res_epochs,
        "finetune.epochs": cfg.finetune.epochs,
        "profile.trials": cfg.profile.trials,
        "export.tune_trials": cfg.export.tune_trials,
        "search.stage_b_candidates": cfg.search.stage_b_candidates,
        "search.stage_b_epochs": cfg.search.stage_b_epochs,
        "search.sensitivity_samples": cfg.search.sensitivity_samples,
        "search.persist_every_s": cfg.search.persist_every_s,
        "pretrain.lr": cfg.pretrain.lr,
        "finetune.lr": cfg.finetune.lr,
        "profile.min_repeat_ms": cfg.profile.min_repeat_ms,
        "cost.validate_assignments": cfg.cost.validate_assignments,
        "profile.calibration_models": cfg.profile.calibration_models,
    }
    for key, value in non_negative.items():
        if value < 0:
            raise ConfigError(f"config key '{key}' must be zero or positive, got {value}")
    if cfg.pretrain.low_res_epochs and not (cfg.pretrain.low_res and 0 < cfg.pretrain.low_res < cfg.data.img_size):
        raise ConfigError(f"config key 'pretrain.low_res' must be an image size below data.img_size "
                          f"({cfg.data.img_size}) when pretrain.low_res_epochs is set, got {cfg.pretrain.low_res}")
    if cfg.bench.budget_s is not None and cfg.bench.budget_s <= 0:
        raise ConfigError(f"config key 'bench.budget_s' must be positive (or null for no cap), got {cfg.bench.budget_s}")
    if not cfg.cost.poison_factor > 1.0:
        raise ConfigError(f"config key 'cost.poison_factor' must be above 1 (a ratio either way), got "
                          f"{cfg.cost.poison_factor}")
    if not 0.0 < cfg.data.val_fraction < 1.0:
        raise ConfigError(f"config key 'data.val_fraction' must be in (0, 1), got {cfg.data.val_fraction}")
    if not 0.0 <= cfg.finetune.kd_weight <= 1.0:
        raise ConfigError(f"config key 'finetune.kd_weight' must be in [0, 1], got {cfg.finetune.kd_weight}")
    shift = cfg.export.shift_primitive
    allowed = ("auto", "matshift", "matshift_decode")
    if any(v not in allowed for v in (shift.values() if isinstance(shift, dict) else [shift])):
        raise ConfigError(f"config key 'export.shift_primitive' must be one of {', '.join(allowed)} (or a mapping "
                          f"of layer name to one of them), got {shift!r}")
    if cfg.data.name == "imagefolder" and not cfg.data.path:
        raise ConfigError("config key 'data.path' is required when data.name is 'imagefolder'")


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b=3`` -> (["a", "b"], 3); the value is parsed as YAML so numbers and lists work."""
    if "=" not in text:
        raise ConfigError(f"--set expects key.sub=value, got {text!r}")
    key, raw = text.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set expects key.sub=value, got {text!r}")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def _merge(data: dict, keys: list[str], value: Any) -> None:
    node = data
    for part in keys[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {'.'.join(keys)}: '{part}' is not a section")
        node = child
    node[keys[-1]] = value


def read_yaml_mapping(path: Path, what: str = "config") -> dict:
    """Read a YAML file that must hold a mapping; errors name the file."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{what} file {path} does not exist; check the path") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read {what} file {path}: {exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{what} file {path} is not valid YAML{where}; fix the syntax") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{what} file {path} must hold a mapping at the top level")
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults <- YAML file <- ``--set`` overrides, validated strictly."""
    data: dict = read_yaml_mapping(Path(path)) if path else {}
    for text in overrides:
        keys, value = parse_override(text)
        _merge(data, keys, value)
    cfg = _build(Config, data)
    _validate(cfg)
    return cfg


def config_to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def config_from_dict(data: dict) -> Config:
    cfg = _build(Config, data)
    _validate(cfg)
    return cfg


def save_config(cfg: Config, folder: str | Path, name: str = "resolved_config.yaml") -> Path:
    path = Path(folder) / name
    data = config_to_dict(cfg)
    if data["search"]["storage"]:
        data["search"]["storage"] = hide_password(data["search"]["storage"])
    atomic_write_text(path, yaml.safe_dump(data, sort_keys=False))
    return path
