"""The cost model: latency and energy of one kernel call, one layer and a whole model assignment.

Layers of lookup:

1. :class:`CostTable` holds one profile (one device + target, see :mod:`dse.profiling.store`). A call
   ``(primitive, b, m, k, n)`` on a backend (``tvm``: the compiled ShiftAddViT; ``torch``: the dense
   PyTorch model) is priced by the measured row when that exact shape was profiled, otherwise by the
   regression law fitted on that primitive+backend's measured rows (:mod:`dse.cost.regression`; the
   estimate carries the law's leave-one-out error and an ``extrapolated`` flag).
2. :meth:`CostModel.for_model` turns a layer inventory into a :class:`ModelCost`: per decision layer
   and per choice, (latency, energy) precomputed once, so pricing one whole-model assignment is a sum
   of array lookups (microseconds; ``python -m dse.benchmarks cost`` prints it). Choices map to calls
   as the README's cost model lists them:

   * linear ``mult`` -> ``matmul``; ``shift`` -> the faster (by latency) of ``matshift`` plus its
     fixed-point conversions (``requant``) and ``matshift_decode`` plus its input rounding (``quantize``) for that
     shape — :func:`fastest_shift_primitive`, the rule the exporter applies to the same profile;
   * linear ``moe`` -> expected cost at the Mult token share ``s``:
     ``s·mult + (1 - s)·shift + router + dispatch`` (the expert costs are the full-layer costs, so
     this interpolates linearly between them; per-call fixed overheads of two smaller expert calls
     are not modelled). ``s`` is the assignment's static capacity if given, else the equilibrium
     share of the balance loss (tokens in inverse proportion to expert cost);
   * attention ``msa`` -> ``bmm`` scores + ``softmax`` + ``bmm`` context (on the torch backend, for an
     attention eager PyTorch fuses, the one ``sdpa`` call it runs instead: :class:`AttentionWork`);
     ``hamming`` -> ``hash`` of queries and keys + ``matadd`` kv + ``matadd`` qkv_out + the normalise/mix step
     (``hamming_mix``);
   * plus the non-primitive work that runs whatever the choice (norms, GELU, residual adds, Linear
     biases, head split/merge, position and patch embedding, head), as the inventory lists it.

Backends: ``tvm`` prices the compiled model from the ``tvm`` rows; ``torch`` prices the PyTorch model
from the ``torch`` rows, where a kernel is replaced by its dense PyTorch baseline
(``dse.profiling.inventory.TORCH_BASELINE``: a shift Linear runs as a float GEMM).

Metric for the MoE balance loss (``cfg.cost.metric``): ``latency`` (ms per token), ``energy``
(mJ per token) or ``mix`` = ``alpha·latency_share + (1 - alpha)·energy_share`` where a share is the
expert's fraction of the two experts' summed cost (unit-free, so the two metrics can be mixed).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

import kernels
from dse.cost import calibration as calib
from dse.cost.regression import CostLaw, PadFn, fit_law
from dse.errors import AssignmentError, ProfileError, TargetUnavailableError
from dse.hardware.device import describe_device
from dse.profiling import store
from dse.profiling.inventory import TORCH_BASELINE
from dse.profiling.store import BACKENDS, profile_path
from kernels.cpu_schedules import tile_padding
from models.moe import equilibrium_share

log = logging.getLogger(__name__)

METRICS = ("latency", "energy", "mix")
LINEAR_CHOICES = ("mult", "shift", "moe")
ATTENTION_CHOICES = ("msa", "hamming")
SHIFT_PRIMITIVES = ("matshift", "matshift_decode")
_SHIFT_EXTRA = {"matshift": "requant", "matshift_decode": "quantize"}  # the op around each shift kernel
_COLUMNS = {"latency": "latency_ms", "energy": "energy_mj"}
_NO_QUANTIZE = "matshift_decode without its input rounding (no 'quantize' rows): understated"


# ----------------------------------------------------------------------------------------------------
# calls and estimates


@dataclasses.dataclass(frozen=True)
class Call:
    """One kernel or op call: ``primitive`` at ``(b, m, k, n)`` (the profile's shape convention),
    ``count`` times (e.g. both residual adds of a block)."""

    primitive: str
    b: int
    m: int
    k: int
    n: int
    count: float = 1.0
    dtype: str | None = None

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (self.b, self.m, self.k, self.n)


@dataclasses.dataclass(frozen=True)
class Estimate:
    """Latency (ms) and energy (mJ) of a call or a group of calls, and how they were obtained.

    ``source``: ``measured`` (every call had its exact row), ``regression`` (every call predicted),
    ``mixed``, or ``partial`` (some work it should include has no price at all, so the figure understates it;
    ``notes`` says which, and a sum with a partial estimate stays partial). ``fit_error``: the worst
    leave-one-out RMSPE among the regression laws used (None if all measured). ``extrapolated``: some call
    lies far outside its law's measured range. ``regressed``: ``(primitive, dtype)`` of every call priced by
    its law (for naming the laws, :meth:`ModelCost.moe_expert_provenance`).
    """

    latency_ms: float
    energy_mj: float
    source: str = "measured"
    fit_error: float | None = None
    extrapolated: bool = False
    regressed: tuple[tuple[str, str], ...] = ()
    notes: tuple[str, ...] = ()

    def __add__(self, other: Estimate) -> Estimate:
        if "partial" in (self.source, other.source):
            source = "partial"
        else:
            source = self.source if self.source == other.source else "mixed"
        return Estimate(
            self.latency_ms + other.latency_ms,
            self.energy_mj + other.energy_mj,
            source,
            _max_opt(self.fit_error, other.fit_error),
            self.extrapolated or other.extrapolated,
            tuple(dict.fromkeys(self.regressed + other.regressed)),
            tuple(dict.fromkeys(self.notes + other.notes)),
        )

    def scaled(self, factor: float) -> Estimate:
        return dataclasses.replace(self, latency_ms=self.latency_ms * factor, energy_mj=self.energy_mj * factor)

    def as_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["regressed"] = [p for p, _ in self.regressed]
        out["notes"] = list(self.notes)
        return out


ZERO = Estimate(0.0, 0.0)


def _max_opt(a: float | None, b: float | None) -> float | None:
    if a is None:
        return b
    if b is None:
        return a
    return max(a, b)


def total(estimates: Iterable[Estimate]) -> Estimate:
    out = None
    for e in estimates:
        out = e if out is None else out + e
    return out if out is not None else ZERO


# ----------------------------------------------------------------------------------------------------
# the profile table


def _default_dtype(primitive: str) -> str:
    if primitive in kernels.names():
        return kernels.get(primitive).default_dtype
    return "float32"


def _norm_dtype(primitive: str, dtype: Any) -> str:
    if dtype is None or (isinstance(dtype, float) and math.isnan(dtype)) or str(dtype) in ("", "nan", "None"):
        return _default_dtype(primitive)
    return str(dtype)


def default_profile_path(profile_cfg: Any) -> Path:
    """The store's profile for this device and ``profile_cfg.target``: ``<dir>/<device>/<target>.csv``."""
    slug = _target_slug(profile_cfg.target)  # first: it loads TVM, which names the host CPU
    device = describe_device(kernels.targets.target_dict(profile_cfg.target)).slug
    return profile_path(profile_cfg.dir, device, slug)


def _target_slug(target: Any) -> str:
    """The slug of the resolved TVM target: resolving first imports TVM, without which the host CPU's
    LLVM name is unknown and ``kernels.target_slug("cpu")`` falls back to an ISA level."""
    return kernels.target_slug(kernels.resolve_target(target))


def read_profile(path: str | Path) -> Any:
    """Load ``<target>.csv`` and its ``.yaml`` metadata (``dse.profiling.store.load_profile``; ProfileError if bad)."""
    return store.load_profile(Path(path))


class CostTable:
    """Exact lookup plus per-(backend, primitive, metric) regression laws over one profile.

    Where a shape was measured more than once on a backend (e.g. default and tuned schedule), the
    fastest row is used — ``kernels.build`` also picks the faster of the two.
    """

    def __init__(self, profile: Any):
        """``profile``: a :class:`dse.profiling.store.Profile` (anything with ``frame``, ``meta``, ``path``)."""
        self.profile = profile
        frame = profile.frame
        required = {"primitive", "batch", "m", "k", "n", "latency_ms"}
        missing = sorted(required - set(frame.columns))
        if missing:
            where = f" {profile.path}" if profile.path else ""
            raise ProfileError(f"profile{where} lacks column(s) {', '.join(missing)}; re-run `dse profile`")
        self._rows: dict[tuple, tuple[float, float]] = {}
        self._shapes: dict[tuple[str, str, str], list[tuple[tuple[int, int, int, int], float, float]]] = {}
        backend = frame["backend"] if "backend" in frame.columns else ["tvm"] * len(frame)
        dtype = frame["dtype"] if "dtype" in frame.columns else [None] * len(frame)
        energy = frame["energy_mj"] if "energy_mj" in frame.columns else [math.nan] * len(frame)
        for prim, bk, b, m, k, n, dt, lat, en in zip(frame["primitive"], backend, frame["batch"], frame["m"],
                                                     frame["k"], frame["n"], dtype, frame["latency_ms"], energy):
            prim, bk = str(prim), str(bk)
            lat, en = float(lat), float(en) if en is not None else math.nan
            if not (math.isfinite(lat) and lat > 0):
                continue
            key = (bk, prim, _norm_dtype(prim, dt), int(b), int(m), int(k), int(n))
            old = self._rows.get(key)
            if old is None or lat < old[0]:
                self._rows[key] = (lat, en)
        for (bk, prim, dt, b, m, k, n), (lat, en) in self._rows.items():
            self._shapes.setdefault((bk, prim, dt), []).append(((b, m, k, n), lat, en))
        self._laws: dict[tuple[str, str, str, str], CostLaw | None] = {}

    @functools.cached_property
    def _tvm_padding(self) -> PadFn | None:
        """How the profile's target pads kernel shapes (``kernels.cpu_schedules.tile_padding``); resolved
        on the first TVM law, since resolving a target loads TVM."""
        target = _meta_target(getattr(self.profile, "meta", None) or {})
        if not (isinstance(target, dict) and target.get("kind") == "llvm"):
            return None

        try:
            return tile_padding(kernels.resolve_target(target))
        except Exception as exc:  # an unknown CPU: price unpadded work rather than fail
            log.warning("cannot tell how %s pads kernel shapes (%s); using unpadded work", target, exc)
            return None

    # ---- what is there ----------------------------------------------------------------------------
    def primitives(self, backend: str) -> list[str]:
        return sorted({p for (bk, p, _dt) in self._shapes if bk == backend})

    def has(self, backend: str, primitive: str) -> bool:
        return any(bk == backend and p == primitive for (bk, p, _dt) in self._shapes)

    def measured(self, backend: str, primitive: str, dtype: str | None = None) -> list[tuple]:
        """``[((b, m, k, n), latency_ms, energy_mj), ...]`` measured for a primitive on a backend."""
        return list(self._shapes.get((backend, primitive, _norm_dtype(primitive, dtype)), []))

    def lookup(self, backend: str, primitive: str, b: int, m: int, k: int, n: int,
               dtype: str | None = None) -> tuple[float, float] | None:
        """(latency_ms, energy_mj) of the measured row, or None."""
        return self._rows.get((backend, primitive, _norm_dtype(primitive, dtype), int(b), int(m), int(k), int(n)))

    def law(self, backend: str, primitive: str, metric: str = "latency", dtype: str | None = None) -> CostLaw | None:
        """The regression law for (backend, primitive, dtype) and metric ``latency`` | ``energy``."""
        dt = _norm_dtype(primitive, dtype)
        key = (backend, primitive, dt, metric)
        if key not in self._laws:
            rows = self._shapes.get((backend, primitive, dt), [])
            law = None
            if rows:
                shapes = np.array([r[0] for r in rows], dtype=np.float64)
                values = np.array([r[1] if metric == "latency" else r[2] for r in rows], dtype=np.float64)
                pad = self._tvm_padding if backend == "tvm" else None
                law = fit_law(primitive, shapes, values, _COLUMNS[metric], dt, pad)
            self._laws[key] = law
        return self._laws[key]

    # ---- pricing ----------------------------------------------------------------------------------
    def estimate(self, backend: str, call: Call) -> Estimate:
        """Price one call (times its count); ProfileError if the profile cannot price it."""
        primitive = call.primitive
        hit = self.lookup(backend, primitive, *call.shape, call.dtype)
        if hit is not None:
            return Estimate(hit[0], hit[1]).scaled(call.count)
        lat_law = self.law(backend, primitive, "latency", call.dtype)
        if lat_law is None:
            where = f" {self.profile.path}" if self.profile.path else ""
            raise ProfileError(f"profile{where} has no {backend} rows for '{call.primitive}'; run `dse profile` "
                               f"for this model and target (backend {backend})")
        lat = lat_law.predict(*call.shape)
        en_law = self.law(backend, primitive, "energy", call.dtype)
        en = en_law.predict(*call.shape) if en_law is not None else math.nan
        return Estimate(lat, en, "regression", lat_law.loo_rmspe, lat_law.extrapolated(*call.shape),
                        ((primitive, _norm_dtype(primitive, call.dtype)),)).scaled(call.count)

    def can_price(self, backend: str, primitive: str) -> bool:
        return self.has(backend, primitive)


# ----------------------------------------------------------------------------------------------------
# profile identity


def _meta_target(meta: Mapping[str, Any]) -> dict[str, Any] | None:
    target = meta.get("target")
    if isinstance(target, str):
        try:
            target = json.loads(target)
        except json.JSONDecodeError:
            return {"kind": target}
    return dict(target) if isinstance(target, Mapping) else None


def _meta_device_slug(meta: Mapping[str, Any]) -> str | None:
    device = meta.get("device")
    if isinstance(device, Mapping):
        return device.get("slug") or device.get("name")
    return str(device) if device else None


def profile_identity(profile: Any) -> tuple[str, str]:
    """(device slug, target slug) the profile was measured on and for: the device an answer priced from it is
    for. ProfileError when its metadata does not say."""
    meta = profile.meta
    device, target = _meta_device_slug(meta), meta.get("target_slug")
    if target is None and _meta_target(meta) is not None:
        try:
            target = kernels.target_slug(_meta_target(meta))
        except Exception:  # a malformed target in the metadata: reported as missing below
            target = None
    if device is None or target is None:
        where = str(profile.path) if profile.path else "the profile"
        raise ProfileError(f"{where} has no device/target metadata (its .yaml is missing or old); "
                           "re-run `dse profile` on its device")
    return str(device), str(target)


def check_profile_target(profile: Any, target: Any) -> None:
    """Refuse a profile measured for another target than ``target`` (any device)."""
    _, have = profile_identity(profile)
    want = _target_slug(target)
    if have != want:
        raise ProfileError(f"{profile.path or 'the profile'} was measured for target {have}, not {want}; drop "
                           "--target to price for the profile's own target, or pass a profile for that target")


def check_profile(profile: Any, target: Any, device_slug: str | None = None) -> None:
    """Refuse a profile measured on another device, or for another target, than the model is compiled for.

    ``target``: what the model is compiled for (a spec or dict; compared by ``kernels.target_slug``);
    ``device_slug``: the device it will run on (default: the device ``target`` describes here; when that
    device is not on this machine, e.g. CUDA priced from a laptop, only the target is compared).
    """
    have_device, have_target = profile_identity(profile)
    want_target = _target_slug(target)
    if device_slug is None:
        try:
            device_slug = describe_device(kernels.targets.target_dict(target)).slug
        except TargetUnavailableError:  # pricing a CUDA deployment from a machine without the GPU
            device_slug = None
    if have_target != want_target or (device_slug is not None and have_device != device_slug):
        where = str(profile.path) if profile.path else "the profile"
        raise ProfileError(f"{where} was measured on {have_device} for target {have_target}, but the model is "
                           f"compiled for {want_target} on {device_slug}; this command measures there, so run "
                           "`dse profile` on that device or pass its --profile")


# ----------------------------------------------------------------------------------------------------
# what a model is made of


@dataclasses.dataclass(frozen=True)
class LinearWork:
    """A decision Linear: ``(b, m, k, n)`` = (1, tokens, in_features, out_features)."""

    name: str
    b: int
    m: int
    k: int
    n: int

    @property
    def tokens(self) -> int:
        return self.b * self.m


@dataclasses.dataclass(frozen=True)
class AttentionWork:
    """A decision attention: the calls each choice makes (products and their softmax / hashing).

    ``calls``: what the compiled model runs, and eager PyTorch too unless ``eager`` names the choice;
    ``eager``: per choice, the calls eager PyTorch makes instead (a fused attention's one ``sdpa`` for msa).
    """

    name: str
    calls: Mapping[str, tuple[Call, ...]]  # {"msa": (...), "hamming": (...)}
    eager: Mapping[str, tuple[Call, ...]] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class ModelWork:
    """Everything a model computes at one batch size, grouped by what decides whether it runs.

    ``fixed``: choice-independent work ``[(label, call)]`` — norms, GELU, residual adds, head splits,
    Linear biases, embed, head. ``moe``: per Linear, the router and dispatch calls of its MoE form.
    ``requant``: per Linear, the extra work of its shift form around the kernel — ``requant`` calls (the
    fixed-point conversions of ``matshift``) and ``quantize`` calls (``matshift_decode``'s input put on the
    same grid) — so the shift choice compares ``matshift + requant`` with ``matshift_decode + quantize``.
    ``framework``: eager PyTorch's own time in a forward (:mod:`dse.profiling.eager`), added on the torch backend only.
    """

    linears: tuple[LinearWork, ...]
    attention: tuple[AttentionWork, ...]
    fixed: tuple[tuple[str, Call], ...] = ()
    moe: Mapping[str, tuple[Call, ...]] = dataclasses.field(default_factory=dict)
    requant: Mapping[str, tuple[Call, ...]] = dataclasses.field(default_factory=dict)
    batch: int = 1
    model: str = ""
    framework: tuple[tuple[str, Call], ...] = ()

    @classmethod
    def from_inventory(cls, inventory: Any) -> ModelWork:
        """From a :class:`dse.profiling.inventory.Inventory` (work items tagged with their layer and choice)."""
        if isinstance(inventory, ModelWork):
            return inventory
        linears: list[LinearWork] = []
        linear_names = set()
        for it in inventory.linears():
            linears.append(LinearWork(it.name, it.b, it.m, it.k, it.n))
            linear_names.add(it.name)
        # attention -> backend -> choice -> calls
        att_calls: dict[str, dict[str, dict[str, list[Call]]]] = {
            name: {bk: {c: [] for c in ATTENTION_CHOICES} for bk in BACKENDS} for name in inventory.attention}
        fixed: list[tuple[str, Call]] = []
        framework: list[tuple[str, Call]] = []
        moe: dict[str, list[Call]] = {}
        requant: dict[str, list[Call]] = {}
        for it in inventory.items:
            if it.kind == "linear":
                continue
            call = Call(it.primitives[0], it.b, it.m, it.k, it.n)
            if it.layer in att_calls and it.choice in ATTENTION_CHOICES:
                for bk in BACKENDS if it.backend is None else (it.backend,):
                    att_calls[it.layer][bk][it.choice].append(call)
            elif it.backend is not None:
                raise ProfileError(f"the inventory gives {it.name} to backend '{it.backend}' alone, which the cost "
                                   "model only knows for attention; update dse.cost.model")
            elif it.kind == "framework":
                framework.append((it.name, call))
            elif it.choice is None:
                fixed.append((it.name, call))
            elif it.layer in linear_names and it.choice == "moe":
                moe.setdefault(it.layer, []).append(call)
            elif it.layer in linear_names and it.choice == "shift":
                requant.setdefault(it.layer, []).append(call)
            else:
                raise ProfileError(f"the inventory lists {it.name} under choice '{it.choice}' of layer "
                                   f"'{it.layer}', which the cost model does not know; update dse.cost.model")
        attention = tuple(
            AttentionWork(name, {c: tuple(v) for c, v in calls["tvm"].items()},
                          {c: tuple(v) for c, v in calls["torch"].items() if v != calls["tvm"][c]})
            for name, calls in att_calls.items())
        return cls(tuple(linears), attention, tuple(fixed), {k: tuple(v) for k, v in moe.items()},
                   {k: tuple(v) for k, v in requant.items()}, int(inventory.batch), str(inventory.model),
                   tuple(framework))


# ----------------------------------------------------------------------------------------------------
# MoE arithmetic


def moe_expected(mult: Estimate, shift: Estimate, overhead: Estimate, share: float) -> Estimate:
    """``share·mult + (1 - share)·shift + overhead`` (router + dispatch)."""
    if not 0.0 <= share <= 1.0:
        raise AssignmentError(f"MoE Mult share {share} must lie in [0, 1]")
    return mult.scaled(share) + shift.scaled(1.0 - share) + overhead


def mix_costs(lat: Mapping[str, float], en: Mapping[str, float], alpha: float) -> dict[str, float]:
    """``alpha·latency_share + (1 - alpha)·energy_share`` per expert (shares of the two experts' sum)."""
    lsum, esum = sum(lat.values()), sum(en.values())
    return {e: alpha * lat[e] / lsum + (1.0 - alpha) * en[e] / esum for e in lat}


# ----------------------------------------------------------------------------------------------------
# whole-model costs


@dataclasses.dataclass(frozen=True)
class LayerCost:
    """One row of the per-layer table."""

    layer: str
    kind: str  # linear | attention | fixed
    choice: str
    estimate: Estimate
    detail: str = ""  # e.g. which shift primitive, the MoE share

    def as_dict(self) -> dict[str, Any]:
        e = self.estimate
        return {"layer": self.layer, "kind": self.kind, "choice": self.choice, "latency_ms": e.latency_ms,
                "energy_mj": e.energy_mj, "source": e.source, "fit_error": e.fit_error,
                "extrapolated": e.extrapolated, "detail": self.detail, "notes": list(e.notes)}


@dataclasses.dataclass(frozen=True)
class Prediction:
    latency_ms: float
    energy_mj: float


class CostModel:
    """Prices calls from one profile on one backend; :meth:`for_model` precomputes a model's table."""

    def __init__(self, profile: Any, backend: str = "tvm", metric: str = "latency",
                 mix_alpha: float = 0.5, calibrated: bool = True):
        if backend not in BACKENDS:
            raise ProfileError(f"unknown backend '{backend}'; use one of {', '.join(BACKENDS)}")
        if metric not in METRICS:
            raise ProfileError(f"unknown cost metric '{metric}'; use one of {', '.join(METRICS)}")
        self.table = profile if isinstance(profile, CostTable) else CostTable(profile)
        self.backend = backend
        self.metric = metric
        self.mix_alpha = float(mix_alpha)
        self.calibrated = bool(calibrated)
        self._warned_partial = False

    @classmethod
    def from_config(cls, profile: Any, cost_cfg: Any, backend: str = "tvm", calibrated: bool | None = None
                    ) -> CostModel:
        """``cfg.cost``'s metric and calibration switch (``calibrated`` overrides the switch)."""
        return cls(profile, backend, cost_cfg.metric, cost_cfg.mix_alpha,
                   cost_cfg.calibrated if calibrated is None else calibrated)

    def _backend_call(self, call: Call) -> Call:
        if self.backend == "torch" and call.primitive in TORCH_BASELINE:
            # the PyTorch model runs the float baseline of a kernel (a shift Linear is a float GEMM)
            return dataclasses.replace(call, primitive=TORCH_BASELINE[call.primitive], dtype=None)
        return call

    def can_price(self, primitive: str) -> bool:
        return self.table.can_price(self.backend, self._backend_call(Call(primitive, 1, 1, 1, 1)).primitive)

    def estimate(self, call: Call) -> Estimate:
        """Latency and energy of one call on this backend: its measured row, else the regression."""
        return self.table.estimate(self.backend, self._backend_call(call))

    def estimate_many(self, calls: Iterable[Call]) -> Estimate:
        return total(self.estimate(c) for c in calls)

    def shift_call(self, lw: LinearWork, extra: Iterable[Call] = ()) -> tuple[str, Estimate]:
        """The faster of ``matshift`` (+ its ``requant`` calls in ``extra``) and ``matshift_decode`` (+ its
        ``quantize`` calls) for this Linear — the exporter's rule (:func:`fastest_shift_primitive`)."""
        extra = tuple(extra)
        best: tuple[str, Estimate] | None = None
        for prim in SHIFT_PRIMITIVES:
            if not self.can_price(prim):
                continue
            est = self.estimate(Call(prim, lw.b, lw.m, lw.k, lw.n))
            around = [c for c in extra if c.primitive == _SHIFT_EXTRA[prim]]
            try:
                est = est + self.estimate_many(around)
            except ProfileError:
                if prim == "matshift":
                    continue  # cannot price its conversions: only matshift_decode is comparable
                # a profile from before ``quantize`` was an op: the kernel alone, said, since it understates
                if around:
                    est = dataclasses.replace(est, source="partial", notes=est.notes + (_NO_QUANTIZE,))
                    if not self._warned_partial:
                        log.warning("the profile has no %s rows for 'quantize', so matshift_decode is priced "
                                    "as its kernel alone (an understatement); run `dse profile` for this model "
                                    "to measure it", self.backend)
                        self._warned_partial = True
            if best is None or est.latency_ms < best[1].latency_ms:
                best = (prim, est)
        if best is None:
            raise ProfileError(f"the profile has no {self.backend} rows for matshift or matshift_decode")
        return best

    def for_model(self, inventory: Any) -> ModelCost:
        """Precompute (latency, energy) per decision layer per choice for ``inventory`` (a layer inventory
        from :mod:`dse.profiling.inventory` or a :class:`ModelWork`), with the profile's in-context factors for
        this model and batch (:mod:`dse.cost.calibration`) when it has them, the backend is ``tvm`` and
        ``calibrated`` is set."""
        work = ModelWork.from_inventory(inventory)
        found = None
        if self.calibrated and self.backend == "tvm":
            found = calib.stored(getattr(self.table.profile, "meta", None), work.model, work.batch)
            if found is None:
                log.debug("the profile has no in-context calibration for %s at batch %d: kernels priced as "
                          "profiled alone", work.model, work.batch)
        return ModelCost(self, work, found)


def fastest_shift_primitive(profile: Any, b: int, m: int, k: int, n: int, backend: str = "tvm") -> str:
    """Which shift kernel the exporter should use for a Linear ``(b, m, k, n)``: ``matshift`` (plus its
    ``requant`` conversions at ``(b, m, k, n)``, the inventory's shape for them) or ``matshift_decode``,
    whichever the profile prices faster — the rule the cost model applies."""
    cm = profile if isinstance(profile, CostModel) else CostModel(profile, backend)
    return cm.shift_call(LinearWork("", b, m, k, n), (Call("requant", b, m, k, n), Call("quantize", b, m, k, k)))[0]


class ModelCost:
    """Per-layer, per-choice costs of one model on one profile and backend.

    ``lat[i, c]``/``en[i, c]`` hold layer ``i``'s cost under choice ``c`` (NaN where the profile cannot
    price that choice on this backend; MoE at its equilibrium share for the configured metric);
    ``fixed`` is the choice-independent work. Pricing an assignment sums one entry per layer.

    With a ``calibration`` every latency is its group's in-context factor times the profiled one
    (:mod:`dse.cost.calibration`; a layer's group is its choice, the fixed work is ``fixed``); ``raw_lat`` and
    ``raw_fixed`` keep the figures as profiled, and :meth:`components` splits a prediction into its groups.
    """

    def __init__(self, model: CostModel, work: ModelWork, calibration: calib.Calibration | None = None):
        self.cost_model = model
        self.work = work
        self.metric = model.metric
        self.calibration = calibration
        self.layers: list[str] = [lw.name for lw in work.linears] + [aw.name for aw in work.attention]
        self.kinds: list[str] = ["linear"] * len(work.linears) + ["attention"] * len(work.attention)
        self.index: dict[str, int] = {name: i for i, name in enumerate(self.layers)}
        self.choices = {"linear": LINEAR_CHOICES, "attention": ATTENTION_CHOICES}
        self._col = {"linear": {c: i for i, c in enumerate(LINEAR_CHOICES)},
                     "attention": {c: i for i, c in enumerate(ATTENTION_CHOICES)}}
        width = max(len(LINEAR_CHOICES), len(ATTENTION_CHOICES))
        n = len(self.layers)
        self.lat = np.full((n, width), np.nan)
        self.raw_lat = np.full((n, width), np.nan)
        self.en = np.full((n, width), np.nan)
        self._est: dict[tuple[str, str], Estimate] = {}
        self._raw_est: dict[tuple[str, str], Estimate] = {}
        self._detail: dict[tuple[str, str], str] = {}
        self._missing: dict[tuple[str, str], str] = {}
        # MoE parts per Linear: (mult, shift, router + dispatch)
        self._moe_parts: dict[str, tuple[Estimate, Estimate, Estimate]] = {}
        self._eager_fallback_logged = False
        for i, lw in enumerate(work.linears):
            self._price_linear(i, lw)
        for j, aw in enumerate(work.attention):
            self._price_attention(len(work.linears) + j, aw)
        # (label, op, estimate) of the choice-independent work
        self.fixed_items: list[tuple[str, str, Estimate]] = [(label, call.primitive, model.estimate(call))
                                                             for label, call in work.fixed]
        if model.backend == "torch":
            self.fixed_items += self._framework(work.framework)
        self.raw_fixed = total(e for _, _, e in self.fixed_items)
        self.fixed_items = [(label, op, self._calibrated(e, "fixed")) for label, op, e in self.fixed_items]
        self.fixed = total(e for _, _, e in self.fixed_items)
        self.lat_flat = self.lat.ravel()
        self.en_flat = self.en.ravel()
        self._width = width
        # for predict(): per kind, [(layer, {choice: (latency, energy)})], and the valid names
        self._by_kind: dict[str, list[tuple[str, dict[str, tuple[float, float]]]]] = {"linear": [], "attention": []}
        for i, (name, kind) in enumerate(zip(self.layers, self.kinds)):
            costs = {c: (float(self.lat[i, j]), float(self.en[i, j])) for c, j in self._col[kind].items()}
            self._by_kind[kind].append((name, costs))
        self._names = {k: {name for name, _ in v} for k, v in self._by_kind.items()}

    @property
    def identity(self) -> tuple[str, str]:
        """(device slug, target slug) of the profile these costs come from: the device they are for."""
        return profile_identity(self.cost_model.table.profile)

    # ---- construction ------------------------------------------------------------------------------

    def _framework(self, calls: tuple[tuple[str, Call], ...]) -> list[tuple[str, str, Estimate]]:
        """Eager PyTorch's own time (:mod:`dse.profiling.eager`): the measured row, else nothing (logged): a profile
        from before the row existed, or from a GPU, prices the eager model by its ops alone."""
        out = []
        for label, call in calls:
            hit = self.cost_model.table.lookup("torch", call.primitive, *call.shape)
            if hit is None:
                log.info("the profile has no eager framework row for %s; its PyTorch prediction is the sum of "
                         "its ops (run `dse profile` for the model to add it)", self.work.model or "this model")
                continue
            if not math.isfinite(hit[1]):
                log.info("eager PyTorch's own time (the framework row) has no energy figure, so the energy of %s "
                         "on PyTorch is unknown, not the sum of its ops", self.work.model or "this model")
            out.append((label, call.primitive, Estimate(hit[0], hit[1]).scaled(call.count)))
        return out

    def _calibrated(self, est: Estimate, group: str) -> Estimate:
        if self.calibration is None:
            return est
        return dataclasses.replace(est, latency_ms=est.latency_ms * self.calibration.factor(group))

    def _set(self, i: int, kind: str, choice: str, raw: Estimate, detail: str = "") -> None:
        c = self._col[kind][choice]
        est = self._calibrated(raw, choice)
        self.lat[i, c], self.en[i, c], self.raw_lat[i, c] = est.latency_ms, est.energy_mj, raw.latency_ms
        self._est[(self.layers[i], choice)] = est
        self._raw_est[(self.layers[i], choice)] = raw
        self._detail[(self.layers[i], choice)] = detail

    def _try(self, i: int, kind: str, choice: str, price) -> None:
        try:
            est, detail = price()
        except ProfileError as exc:
            self._missing[(self.layers[i], choice)] = str(exc)
            return
        self._set(i, kind, choice, est, detail)

    def _price_linear(self, i: int, lw: LinearWork) -> None:
        cm = self.cost_model
        self._try(i, "linear", "mult", lambda: (cm.estimate(Call("matmul", lw.b, lw.m, lw.k, lw.n)), "matmul"))
        self._try(i, "linear", "shift", lambda: cm.shift_call(lw, self.work.requant.get(lw.name, ()))[::-1])
        key = (lw.name, "mult")
        if key in self._est and (lw.name, "shift") in self._est:
            try:
                overhead = cm.estimate_many(self.work.moe.get(lw.name, ()))
            except ProfileError as exc:
                self._missing[(lw.name, "moe")] = str(exc)
                return
            mult, shift = self._raw_est[key], self._raw_est[(lw.name, "shift")]
            self._moe_parts[lw.name] = (mult, shift, overhead)
            share = self.equilibrium_share(lw.name)
            self._set(i, "linear", "moe", moe_expected(mult, shift, overhead, share), f"mult share {share:.2f}")

    def _price_attention(self, i: int, aw: AttentionWork) -> None:
        for choice in ATTENTION_CHOICES:
            calls = self._eager_calls(aw, choice) if self.cost_model.backend == "torch" else aw.calls.get(choice)
            if calls is None:
                self._missing[(aw.name, choice)] = f"the inventory has no '{choice}' form for {aw.name}"
                continue
            self._try(i, "attention", choice, lambda calls=calls: (self.cost_model.estimate_many(calls), ""))

    def _eager_calls(self, aw: AttentionWork, choice: str) -> tuple[Call, ...] | None:
        """The calls eager PyTorch makes for ``choice``: its own form (a fused attention's ``sdpa``) where the
        profile has rows for it, else the compiled model's calls (logged once): a profile from before fused
        attention was profiled prices eager attention as the ops it fuses."""
        eager = aw.eager.get(choice)
        if eager is None:
            return aw.calls.get(choice)
        missing = sorted({c.primitive for c in eager if not self.cost_model.can_price(c.primitive)})
        if not missing:
            return eager
        if not self._eager_fallback_logged:
            self._eager_fallback_logged = True
            log.info("the profile has no torch rows for %s, which eager PyTorch runs for %s's %s; pricing it as "
                     "the unfused ops (%s) instead, which overestimates long sequences (re-run `dse profile` for "
                     "the model to add the rows)", ", ".join(missing), self.work.model or "this model", choice,
                     ", ".join(c.primitive for c in aw.calls.get(choice, ())))
        return aw.calls.get(choice)

    # ---- MoE ---------------------------------------------------------------------------------------
    @property
    def energy_sources(self) -> list[str]:
        """The profile rows' energy sources (``Profile.energy_sources``; empty for a profile-like stand-in)."""
        return list(getattr(self.cost_model.table.profile, "energy_sources", []))

    def moe_expert_costs(self, layer_name: str) -> dict[str, float]:
        """Cost of each expert per token for the MoE Linear ``layer_name`` in the configured metric
        (the :class:`models.costs.ExpertCostModel` protocol)."""
        parts = self._moe_parts.get(layer_name)
        if parts is None:
            reason = self._missing.get((layer_name, "moe")) or self._missing.get((layer_name, "shift")) \
                or self._missing.get((layer_name, "mult"))
            if layer_name not in self.index or self.kinds[self.index[layer_name]] != "linear":
                raise AssignmentError(f"'{layer_name}' is not a Linear of this model; MoE layers are Linears "
                                      f"such as {self.layers[0] if self.layers else 'blocks.0.mlp.fc1'}")
            raise ProfileError(f"cannot price the experts of '{layer_name}': {reason}")
        mult, shift, _ = parts
        tokens = next(lw.tokens for lw in self.work.linears if lw.name == layer_name)
        lat = {"mult": mult.latency_ms / tokens, "shift": shift.latency_ms / tokens}
        en = {"mult": mult.energy_mj / tokens, "shift": shift.energy_mj / tokens}
        if self.metric == "latency":
            return lat
        if self.metric == "energy":
            if not all(math.isfinite(v) and v > 0 for v in en.values()):
                raise ProfileError(f"the profile has no energy for the experts of '{layer_name}'; use "
                                   "cost.metric=latency or re-profile with an energy source")
            return en
        return mix_costs(lat, en, self.cost_model.mix_alpha)

    def moe_expert_provenance(self, layer_name: str) -> dict[str, Any]:
        """Where :meth:`moe_expert_costs` of ``layer_name`` come from (the optional half of
        :class:`models.costs.ExpertCostModel`): ``source`` of the two experts together (``measured``,
        ``regression``, ``mixed`` or ``partial``), the profile's device, target, path and date, each expert's
        own source and primitive, the regression laws behind any predicted call (law, rows, leave-one-out
        RMSPE), notes, and the energy sources when the metric uses energy."""
        self.moe_expert_costs(layer_name)  # raises why the layer cannot be priced
        mult, shift, _ = self._moe_parts[layer_name]
        both = mult + shift
        profile = self.cost_model.table.profile
        meta = getattr(profile, "meta", None) or {}
        try:
            device, target = self.identity
        except ProfileError:  # a profile without metadata (tests, stand-ins): say so rather than guess
            device, target = None, None
        out: dict[str, Any] = {
            "source": both.source, "device": device, "target": target,
            "profile": str(profile.path) if getattr(profile, "path", None) else None,
            "profile_date": str(meta.get("updated") or meta.get("created") or "") or None,
            "backend": self.cost_model.backend, "metric": self.metric,
            "experts": {"mult": {"source": mult.source, "primitive": "matmul"},
                        "shift": {"source": shift.source, "primitive": self._detail.get((layer_name, "shift"), "")}},
        }
        metrics = {"latency": ("latency",), "energy": ("energy",), "mix": ("latency", "energy")}[self.metric]
        laws = []
        for primitive, dtype in both.regressed:
            for metric in metrics:
                law = self.cost_model.table.law(self.cost_model.backend, primitive, metric, dtype)
                if law is not None:
                    laws.append(law.describe())
        if laws:
            out["laws"] = laws
            out["fit_error"] = both.fit_error
            out["extrapolated"] = both.extrapolated
        if both.notes:
            out["notes"] = list(both.notes)
        if self.metric != "latency":
            out["energy_source"] = self.energy_sources
        return out

    def equilibrium_share(self, layer_name: str) -> float:
        c = self.moe_expert_costs(layer_name)
        return equilibrium_share(c)

    def moe_cost(self, layer_name: str, share: float | None = None) -> Estimate:
        """Expected cost of the MoE form of ``layer_name`` at Mult share ``share`` (default: equilibrium)."""
        return self._calibrated(self._raw_moe(layer_name, share), "moe")

    def _raw_moe(self, layer_name: str, share: float | None) -> Estimate:
        if layer_name not in self._moe_parts:
            self.moe_expert_costs(layer_name)  # raises the reason
        mult, shift, overhead = self._moe_parts[layer_name]
        return moe_expected(mult, shift, overhead, self.equilibrium_share(layer_name) if share is None else share)

    # ---- prediction --------------------------------------------------------------------------------
    def choice_indices(self, assignment: Any) -> np.ndarray:
        """Flat indices into ``lat``/``en`` for an assignment (unnamed layers take the dense choice)."""
        out = np.empty(len(self.layers), dtype=np.intp)
        att, lin = assignment.attention, assignment.linear
        for i, (name, kind) in enumerate(zip(self.layers, self.kinds)):
            choice = (lin.get(name, "mult") if kind == "linear" else att.get(name, "msa"))
            col = self._col[kind].get(choice)
            if col is None:
                raise AssignmentError(f"invalid {kind} choice '{choice}' for layer '{name}'")
            out[i] = i * self._width + col
        self._check_known(assignment)
        return out

    def _check_known(self, assignment: Any) -> None:
        for kind in ("attention", "linear"):
            for name in getattr(assignment, kind):
                if name not in self.index:
                    raise AssignmentError(f"unknown {kind} layer '{name}' for this model; valid layers: "
                                          f"{', '.join(self.layers[:4])}, ...")

    def predict(self, assignment: Any) -> Prediction:
        """Whole-model (latency_ms, energy_mj) of an assignment: fixed work + one entry per layer.

        Plain Python over precomputed tuples (tens of microseconds for a 12-block ViT); layers the
        assignment does not name take the dense choice.
        """
        lin, att = assignment.linear, assignment.attention
        if not (lin.keys() <= self._names["linear"] and att.keys() <= self._names["attention"]):
            self._check_known(assignment)
        lat, en = self.fixed.latency_ms, self.fixed.energy_mj
        try:
            for section, default, layers in ((lin, "mult", self._by_kind["linear"]),
                                             (att, "msa", self._by_kind["attention"])):
                for name, costs in layers:
                    c = costs[section.get(name, default)]
                    lat += c[0]
                    en += c[1]
        except KeyError:
            self.choice_indices(assignment)  # raises the AssignmentError naming the layer and choice
            raise
        capacity = getattr(assignment, "capacity", None)
        if capacity:
            for name, share in capacity.items():
                if (name, "moe") not in self._est:
                    lat = math.nan
                    break
                eq, at = self._est[(name, "moe")], self.moe_cost(name, share)
                lat += at.latency_ms - eq.latency_ms
                en += at.energy_mj - eq.energy_mj
        if not math.isfinite(lat):
            self._raise_missing(self.choice_indices(assignment))
        return Prediction(lat, en)

    def predict_indices(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Vectorised: ``idx`` [trials, layers] of choice columns -> (latency_ms [trials], energy_mj [trials])."""
        flat = np.arange(len(self.layers)) * self._width + np.asarray(idx)
        return (self.fixed.latency_ms + self.lat_flat[flat].sum(axis=-1),
                self.fixed.energy_mj + self.en_flat[flat].sum(axis=-1))

    def _raise_missing(self, idx: np.ndarray) -> None:
        for flat in idx:
            i, c = divmod(int(flat), self._width)
            if not math.isfinite(self.lat[i, c]):
                choice = self.choices[self.kinds[i]][c]
                reason = self._missing.get((self.layers[i], choice), "not priced")
                raise ProfileError(f"cannot price '{choice}' for {self.layers[i]} on backend "
                                   f"{self.cost_model.backend}: {reason}")
        raise ProfileError("the profile cannot price this assignment (non-finite fixed work)")

    def per_layer(self, assignment: Any) -> list[LayerCost]:
        """The table behind :meth:`predict`: one row per decision layer, then the fixed work."""
        idx = self.choice_indices(assignment)
        rows = []
        for flat, name, kind in zip(idx, self.layers, self.kinds):
            i, c = divmod(int(flat), self._width)
            choice = self.choices[kind][c]
            if (name, choice) not in self._est:
                self._raise_missing(np.array([flat]))
            est, detail = self._est[(name, choice)], self._detail.get((name, choice), "")
            if choice == "moe" and name in getattr(assignment, "capacity", {}):
                share = assignment.capacity[name]
                est, detail = self.moe_cost(name, share), f"mult share {share:.2f} (capacity)"
            rows.append(LayerCost(name, kind, choice, est, detail))
        rows += [LayerCost(label, "fixed", "-", est, op) for label, op, est in self.fixed_items]
        return rows

    def source(self, assignment: Any) -> str:
        """How the whole-model figures of ``assignment`` were obtained: ``measured`` when every call had its row,
        else ``regression``, ``mixed`` or ``partial`` (:class:`Estimate`)."""
        return total(r.estimate for r in self.per_layer(assignment)).source

    def choice_names(self, assignment: Any) -> tuple[str, ...]:
        """The choice of every decision layer, model order (unnamed layers take the dense choice)."""
        return tuple(self.choices[kind][int(flat) % self._width]
                     for flat, kind in zip(self.choice_indices(assignment), self.kinds))

    def components(self, assignment: Any) -> dict[str, float]:
        """The uncalibrated latency of ``assignment`` split into the calibration's groups
        (:data:`dse.cost.calibration.GROUPS`: the fixed work, then the layers under each choice), in ms."""
        out = dict.fromkeys(calib.GROUPS, 0.0)
        out["fixed"] = self.raw_fixed.latency_ms
        for flat, kind in zip(self.choice_indices(assignment), self.kinds):
            i, c = divmod(int(flat), self._width)
            out[self.choices[kind][c]] += float(self.raw_lat[i, c])
        for name, share in (getattr(assignment, "capacity", None) or {}).items():
            out["moe"] += self._raw_moe(name, share).latency_ms - self._raw_est[(name, "moe")].latency_ms
        if not all(math.isfinite(v) for v in out.values()):
            self._raise_missing(self.choice_indices(assignment))
        return out

    def describe(self) -> dict[str, Any]:
        return {"layers": len(self.layers), "backend": self.cost_model.backend, "metric": self.metric,
                "fixed_latency_ms": self.fixed.latency_ms, "fixed_energy_mj": self.fixed.energy_mj,
                "calibration": None if self.calibration is None else self.calibration.as_meta(),
                "unpriced": sorted(f"{n}:{c}" for n, c in self._missing)}
