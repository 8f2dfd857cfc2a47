"""``dse search``: Optuna search over per-layer primitive assignments, in two stages.

Stage A (cost only, thousands of trials). Minimise (predicted latency, predicted energy, accuracy-risk
proxy) over the categorical space of :mod:`dse.search.space` with NSGA-II (Deb et al. 2002;
``optuna.samplers.NSGAIISampler``, population ``search.population``). Why NSGA-II: the space is 20-60
categorical dimensions, the objective costs microseconds (a sum of table lookups, :mod:`dse.cost.model`; the
proxy of :mod:`dse.search.sensitivity`), and a few thousand trials are wanted; NSGA-II's per-trial overhead is a
small constant, where Optuna 5's multi-objective TPE refits its models on every trial
(``python -m dse.benchmarks search`` prints both rates).
The three baselines are enqueued first (all-mult, all-shift with MSA, the ShiftAddViT recipe).
With several profiles (``search.profile`` a list, from any devices) the latency objective is one per
device (``latency_ms@<device>``), so the front holds the designs that trade one device's speed for
another's; energy is the first device's.

Storage. A storage write per trial would cap stage A at ~3 trials/s on SQLite, so trials run in an
in-memory study (ask/tell) and are written to the persistent study in batches — every
``search.persist_every_s`` seconds, at the end, and on KeyboardInterrupt/SIGTERM — by
:class:`dse.search.trial_store.TrialStore` (one transaction per batch). The persistent study holds every trial;
a rerun of the same command seeds a fresh in-memory study from the stored trials and runs until the
stored count reaches ``search.trials``. A SIGKILL loses at most the unflushed batch. Several workers
(processes or machines) may share one study through a server database (``--storage
postgresql://...``): each registers a worker index (its sampler seed), writes its batches, and pulls the
others' trials into its in-memory population at every flush.

Stage B (accuracy, a handful of trials). Candidates spread along the stage-A front
(``search.stage_b_candidates``, farthest-point in normalised objective space, starting at the fastest),
plus the recipe, are reparameterised from the dense checkpoint and fine-tuned for
``search.stage_b_epochs`` by :func:`dse.training.finetune.finetune`; their validation accuracy goes into a second
study (objectives: -accuracy, predicted latency) with the budgets ``search.latency_budget_ms`` /
``search.energy_budget_mj`` as Optuna constraints (``Trial.set_constraint``, feasible when <= 0).

Choosing ``best_assignment.yaml``: the dense design (all-mult: the model compiled as it is, with the dense
accuracy and no fine-tuning) is always a candidate. Among candidates meeting the budgets, the fastest
predicted latency whose accuracy is within ``search.max_accuracy_drop`` points of the dense accuracy, a tie
going to the design that changes fewer layers; if none is within, the most accurate. So a design the dense
model beats or equals on latency and accuracy is never chosen. With stage A only (no accuracy measured),
the fastest front design (or the dense one) whose risk proxy is no higher than the recipe's.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import json
import logging
import math
import random
import signal
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import torch
from torch.utils.data import Subset

from dse.checkpoints import load_dense
from dse.config import Config, config_to_dict, hide_password, save_config
from dse.cost import provenance
from dse.cost.sources import CostSource, energy_label, load_device_costs
from dse.errors import ConfigError, ProfileError, StageError
from dse.fileio import atomic_write_text, fingerprint, sha256_file
from dse.search import pareto, sensitivity
from dse.search.sensitivity import risk_table
from dse.search.space import SearchSpace
from dse.search.trial_store import TrialStore, open_storage, with_driver
from dse.training import finetune as finetuning
from dse.training.data import load_data
from dse.training.finetune import fit_batch, reparam_options
from models.assignment import ATTENTION_CHOICES, LINEAR_CHOICES, Assignment, layer_kinds
from models.moe import equilibrium_share

log = logging.getLogger(__name__)

OBJECTIVES_A = ("latency_ms", "energy_mj", "risk")
OBJECTIVES_B = ("neg_accuracy", "latency_ms")
STAGE_B_SUFFIX = "-stage-b"


def objective_names(labels: Sequence[str]) -> tuple[str, ...]:
    """Stage A's objectives: one predicted latency per device (``latency_ms`` alone for one device), then the
    first device's energy and the risk proxy."""
    if len(labels) <= 1:
        return OBJECTIVES_A
    return (*(f"latency_ms@{label}" for label in labels), "energy_mj", "risk")


def priced_choices(costs: CostSource, kinds: Mapping[str, str]) -> dict[str, tuple[str, ...]]:
    """{layer: choices the cost source can price}: each choice probed on the dense assignment with only
    that layer changed (a ProfileError or a non-finite result means "cannot")."""
    out: dict[str, tuple[str, ...]] = {}
    for name, kind in kinds.items():
        ok = []
        for choice in ATTENTION_CHOICES if kind == "attention" else LINEAR_CHOICES:
            plan = (
                Assignment(attention={name: choice})
                if kind == "attention"
                else Assignment(linear={name: choice})
            )
            try:
                got = costs.predict(plan)
            except (ProfileError, StageError, KeyError) as exc:
                log.info("cannot price %s for %s: %s", choice, name, exc)
                continue
            if math.isfinite(got.latency_ms) and math.isfinite(got.energy_mj):
                ok.append(choice)
        out[name] = tuple(ok)
    return out


# ---------------------------------------------------------------------------------------------------
# The stage-A objective


class Objective:
    """params -> (predicted latency ms on each device, predicted energy mJ on the first, risk proxy)."""

    def __init__(self, space: SearchSpace, costs: CostSource, risk: Mapping[str, Mapping[str, float]],
                 other_devices: Sequence[CostSource] = ()):
        self.space, self.costs, self.risk, self.others = space, costs, risk, tuple(other_devices)

    def __call__(self, params: Mapping[str, str]) -> tuple[float, ...]:
        layer_choice = self.space.choices(params)
        assignment = self.space.assignment(params)
        got = self.costs.predict(assignment)
        others = [float(c.predict(assignment).latency_ms) for c in self.others]
        proxy = math.fsum(self.risk[layer][choice] for layer, choice in layer_choice.items())
        return (float(got.latency_ms), *others, float(got.energy_mj), proxy)


# ---------------------------------------------------------------------------------------------------
# Stage A


def default_storage(out: Path) -> str:
    return f"sqlite:///{Path(out).resolve() / 'study.db'}"


def quiet_optuna() -> contextlib.AbstractContextManager:
    @contextlib.contextmanager
    def quiet() -> Iterator[None]:
        level = optuna.logging.get_verbosity()
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                yield
        finally:
            optuna.logging.set_verbosity(level)

    return quiet()


def open_study(
    url: str,
    name: str,
    directions: Sequence[str],
    metric_names: Sequence[str],
    space: SearchSpace | None = None,
    objective_key: str | None = None,
):
    """(RDB storage, study) — created or loaded; a study of another search space, other objectives or
    objectives priced otherwise (``objective_key``, :func:`objective_key`) is refused rather than mixed."""
    storage = open_storage(url)
    try:
        study = optuna.create_study(
            storage=storage, study_name=name, directions=list(directions), load_if_exists=True
        )
    except ValueError as exc:
        raise StageError(f"study '{name}' in {url} cannot be used: {exc}") from None
    have = [d.name.lower() for d in study.directions]
    if have != list(directions):
        raise StageError(
            f"study '{name}' in {url} has objectives {have}, not {list(directions)}; use another --study name"
        )
    if study.metric_names is None:
        with contextlib.suppress(Exception):  # a concurrent worker may set them first
            study.set_metric_names(list(metric_names))
    elif list(study.metric_names) != list(metric_names):  # e.g. latency on other devices
        raise StageError(
            f"study '{name}' in {url} has objectives {list(study.metric_names)}, not {list(metric_names)}; "
            "use another --study name"
        )
    if space is not None:
        with contextlib.suppress(Exception):  # informative only; a concurrent worker may set it first
            study.set_user_attr("dse:params", {p.name: list(p.choices) for p in space.params})
        _same_identity(study, storage, name, url, "dse:space", space.fingerprint(),
                       "was made for another search space (other layers, freeze or tie settings)")
    if objective_key is not None:
        _same_identity(study, storage, name, url, "dse:objective", objective_key,
                       "holds trials priced otherwise (another profile, cost settings or dense checkpoint)")
    return storage, study


def _same_identity(study: Any, storage: Any, name: str, url: str, attr: str, value: str, what: str) -> None:
    """Record ``value`` under the study's user attribute ``attr``, or refuse a study that holds another."""
    stored = study.user_attrs.get(attr)
    if stored is None:
        with contextlib.suppress(Exception):  # a concurrent worker may set it first; compared below
            study.set_user_attr(attr, value)
        stored = optuna.load_study(study_name=name, storage=storage).user_attrs.get(attr, value)
    if stored != value:
        raise StageError(f"study '{name}' in {hide_password(url)} {what}; use another --study name or output "
                         "folder")


def objective_key(space: SearchSpace, objective: Callable[[Mapping[str, str]], Sequence[float]]) -> str:
    """What the objective answers for the baseline designs: any change of profile, cost settings or risk
    table changes it, so a study's stored values are never mixed with values priced another way."""
    values = [[float(f"{v:.9g}") for v in objective(params)] for params in space.baselines().values()]
    return fingerprint(values)


def _sampler(kind: str, population: int, seed: int):
    if kind == "nsga2":
        return optuna.samplers.NSGAIISampler(population_size=population, seed=seed)
    if kind == "tpe":
        return optuna.samplers.TPESampler(seed=seed)
    if kind == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    raise ConfigError(f"unknown search.sampler '{kind}'; use nsga2, tpe or random")


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM raises KeyboardInterrupt in the main thread, so the unflushed batch is written first."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """Hold SIGINT/SIGTERM while a batch is written and marked written, so an interrupt can neither split
    the two (which would write the batch twice) nor lose it; the signal is delivered right after."""
    sigs = {signal.SIGINT, signal.SIGTERM}
    try:
        old = signal.pthread_sigmask(signal.SIG_BLOCK, sigs)
    except (AttributeError, ValueError, OSError):  # not a POSIX main thread
        yield
        return
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


@dataclasses.dataclass
class StageAResult:
    stored: int  # completed trials in the study at the end
    evaluated: int  # trials this process evaluated (baselines included)
    written: int  # of which written (a baseline another worker stored first is not)
    seconds: float
    worker: int
    repeats: int = 0  # offspring that repeated a design already in the study: replaced, not stored again

    @property
    def rate(self) -> float:
        return self.evaluated / self.seconds if self.seconds > 0 else float("nan")


def run_stage_a(
    space: SearchSpace,
    objective: Callable[[Mapping[str, str]], Sequence[float]],
    storage_url: str,
    study_name: str,
    *,
    trials: int,
    sampler: str = "nsga2",
    population: int = 100,
    seed: int = 0,
    persist_every_s: float = 2.0,
    progress: Callable[[str], None] | None = None,
    objectives: Sequence[str] = OBJECTIVES_A,
) -> StageAResult:
    """Run stage A until the persistent study holds ``trials`` completed trials, each a distinct design:
    an NSGA-II offspring that repeats a design already evaluated is not stored again (its values are known)
    but replaced by the nearest unseen design (:func:`_unseen_neighbour`), so the budget buys new designs
    and a converged population keeps exploring around its front. A space with fewer designs than
    ``trials`` ends when it is exhausted, or when no unseen design was found ``20 x population`` times in
    a row."""
    with quiet_optuna():
        run = _StageA(space, objective, storage_url, study_name, trials=trials, sampler=sampler,
                      population=population, seed=seed, persist_every_s=persist_every_s, progress=progress,
                      objectives=objectives)
        with _sigterm_as_interrupt():
            try:
                while run.stored + len(run.pending) < run.target and run.step():
                    pass
                run.flush()
            except KeyboardInterrupt:
                log.warning("stage A interrupted: writing %d pending trials before exiting", len(run.pending))
                run.flush()
                log.warning("stage A: %d trials stored; rerun the same command to continue", run.stored)
                raise
    if run.repeats:
        log.info("stage A: %d offspring repeated known designs; replaced by unseen neighbours where the space "
                 "had any", run.repeats)
    return StageAResult(run.stored, run.evaluated, run.written, time.perf_counter() - run.t0, run.worker,
                        run.repeats)


class _StageA:
    """One worker's stage A: an in-memory NSGA-II study seeded from the persistent one, asked one design at a
    time (:meth:`step`), its finished trials written in batches (:meth:`flush`)."""

    def __init__(self, space: SearchSpace, objective: Callable[[Mapping[str, str]], Sequence[float]],
                 storage_url: str, study_name: str, *, trials: int, sampler: str, population: int, seed: int,
                 persist_every_s: float, progress: Callable[[str], None] | None, objectives: Sequence[str]):
        self.t0 = time.perf_counter()
        self.space, self.objective, self.study_name = space, objective, study_name
        self.population, self.persist_every_s, self.progress = population, persist_every_s, progress
        directions = ["minimize"] * len(objectives)
        storage, _ = open_study(storage_url, study_name, directions, objectives, space, objective_key(space, objective))
        self.store = TrialStore(storage, study_name)
        self.worker = self.store.register_worker()
        worker_seed = seed + 7919 * self.worker  # workers sharing a study explore differently
        self.mem = optuna.create_study(directions=directions, sampler=_sampler(sampler, population, worker_seed))
        stored = self.store.read_new()
        _check_space(space, stored, study_name)
        self.mem.add_trials(stored)
        self.seen = {space.key(t.params) for t in stored}
        self.stored = self.store.count()
        self.target = min(trials, space.size())
        self.rng = random.Random(worker_seed)
        for name, params in space.baselines().items():
            self.mem.enqueue_trial(params, user_attrs={"baseline": name}, skip_if_exists=True)
        log.info("stage A: worker %d, %d stored trials, target %d", self.worker, self.stored, self.target)
        self.pending: list[optuna.trial.FrozenTrial] = []
        self.evaluated = self.written = self.seq = self.repeats = self.in_a_row = 0
        self.last_flush = time.monotonic()

    def step(self) -> bool:
        """Ask for one design and evaluate it unless it is known; False once offspring have repeated known
        designs, with no unseen neighbour left, ``20 x population`` times in a row."""
        trial = self.mem.ask()
        if {"baseline", "replaces_repeat"} & set(trial.user_attrs):
            # Every parameter of an enqueued design is fixed, so it would never consult the sampler; asking
            # for the relative sample places it in a GA generation (parents).
            _ = trial.relative_params
        params = self.space.suggest(trial)
        key = self.space.key(params)
        if key in self.seen and "baseline" not in trial.user_attrs:
            self.mem.tell(trial, state=optuna.trial.TrialState.FAIL)  # known: not a new design
            self.repeats += 1
            neighbour = _unseen_neighbour(self.space, params, self.seen, self.rng)
            if neighbour is not None:  # evaluated next, in this offspring's place
                self.mem.enqueue_trial(neighbour, user_attrs={"replaces_repeat": True})
                return True
            self.in_a_row += 1
            if self.in_a_row >= 20 * self.population:
                log.warning("stage A: the last %d offspring all repeated known designs; stopping at %d distinct "
                            "designs", self.in_a_row, self.stored + len(self.pending))
                return False
            return True
        self.seen.add(key)
        self.in_a_row = 0
        values = self.objective(params)
        trial.set_user_attr("worker", self.worker)
        if "baseline" not in trial.user_attrs:
            trial.set_user_attr("seq", self.seq)
            self.seq += 1
        self.pending.append(self.mem.tell(trial, list(values)))
        self.evaluated += 1
        if time.monotonic() - self.last_flush >= self.persist_every_s:
            self.flush()
        return True

    def flush(self) -> None:
        """Write the pending trials (signals deferred: a batch is written whole) and take in other workers'."""
        if self.pending:
            with _signals_deferred():
                self.written += len(self.store.write(self.pending, unique_attr="baseline"))
                self.pending.clear()
        others = self.store.read_new()
        if others:
            _check_space(self.space, others, self.study_name)
            self.mem.add_trials(others)
            self.seen.update(self.space.key(t.params) for t in others)
        self.stored = self.store.count()
        self.last_flush = time.monotonic()
        if self.progress is not None:
            rate = self.evaluated / max(1e-9, time.perf_counter() - self.t0)
            self.progress(f"stage A: {self.stored}/{self.target} trials stored ({rate:.0f} trials/s here)")


def _unseen_neighbour(space: SearchSpace, params: Mapping[str, str], seen: set[tuple[str, ...]],
                      rng: random.Random, tries: int = 64) -> dict[str, str] | None:
    """A design not in ``seen`` that differs from ``params`` in as few parameters as possible: ``tries``
    random draws at each Hamming distance 1, 2, ... (a repeat is a converged offspring; its neighbours are
    the mutations NSGA-II would try next). None when every draw was already seen."""
    mutable = [p for p in space.params if len(p.choices) > 1]
    for distance in range(1, len(mutable) + 1):
        for _ in range(tries):
            out = dict(params)
            for p in rng.sample(mutable, distance):
                out[p.name] = rng.choice([c for c in p.choices if c != params[p.name]])
            if space.key(out) not in seen:
                return out
    return None


def _check_space(space: SearchSpace, trials: Sequence[Any], study_name: str) -> None:
    dists = space.distributions()
    for t in trials:
        if t.distributions != dists:
            raise StageError(
                f"study '{study_name}' holds trial {t.number} of another search space; use another "
                "--study name or output folder"
            )


def stored_trials(storage_url: str, study_name: str) -> list[Any]:
    """Every completed trial of a stage-A study (bulk read)."""
    return TrialStore(open_storage(storage_url), study_name).read_new()


# ---------------------------------------------------------------------------------------------------
# The front


def front_table(
    space: SearchSpace, trials: Sequence[Any], devices: Sequence[str] = ()
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], np.ndarray]:
    """(front rows, baseline rows, all objective values [n, objectives]); the front is de-duplicated by
    params (the lowest trial number stands for its duplicates). With several ``devices`` a row also has
    ``latency_ms@<device>`` per device and ``latency_rel``: the mean over devices of its latency over the
    all-mult design's there (unit-free, so every device counts equally); ``latency_ms`` is the first's."""
    width = 3 + max(0, len(devices) - 1)
    values = np.array([t.values for t in trials], dtype=float).reshape(-1, width)
    dense_key = space.key(space.baselines()["all-mult"])
    dense_lat = next((values[i, : width - 2] for i, t in enumerate(trials) if space.key(t.params) == dense_key),
                     None)
    unique: dict[tuple, int] = {}
    for i, t in enumerate(trials):
        unique.setdefault(space.key(t.params), i)
    idx = np.array(sorted(unique.values()), dtype=int)
    mask = pareto.nondominated(values[idx]) if len(idx) else np.zeros(0, dtype=bool)
    front_idx = idx[mask]
    front_keys = {space.key(trials[i].params) for i in front_idx}

    def row(i: int) -> dict[str, Any]:
        t = trials[i]
        layer_choice = space.choices(t.params)
        per_device = {}
        if len(devices) > 1:
            per_device = {f"latency_ms@{d}": float(v) for d, v in zip(devices, t.values[: width - 2])}
            if dense_lat is not None:
                per_device["latency_rel"] = float(np.mean(np.asarray(t.values[: width - 2]) / dense_lat))
        return {
            "trial": t.number,
            "latency_ms": float(t.values[0]),
            **per_device,
            "energy_mj": float(t.values[-2]),
            "risk": float(t.values[-1]),
            "baseline": t.user_attrs.get("baseline", ""),
            **{f"n_{k}": v for k, v in SearchSpace.counts(layer_choice).items()},
            "params": dict(t.params),
        }

    front = sorted((row(i) for i in front_idx), key=lambda r: (r["latency_ms"], r["risk"]))
    baselines = []
    for i, t in enumerate(trials):
        if t.user_attrs.get("baseline"):
            r = row(i)
            r["on_front"] = space.key(t.params) in front_keys
            dom = pareto.dominated_by(values[i], values[front_idx]) if len(front_idx) else []
            r["dominated_by"] = [int(trials[front_idx[j]].number) for j in dom[:5]]
            baselines.append(r)
    baselines.sort(key=lambda r: r["baseline"])
    return front, baselines, values


def _latencies(row: Mapping[str, Any]) -> list[float]:
    """The row's predicted latency on every searched device (one value for one device)."""
    per_device = [v for k, v in row.items() if k.startswith("latency_ms@")]
    return per_device or [row["latency_ms"]]


def _speed_key(row: Mapping[str, Any]) -> float:
    """What "fastest" means when choosing: the latency, or over several devices ``latency_rel``."""
    return row.get("latency_rel", row["latency_ms"])


def _feasible(row: Mapping[str, Any], latency_budget: float | None, energy_budget: float | None) -> bool:
    return (latency_budget is None or row["latency_ms"] <= latency_budget) and (
        energy_budget is None or row["energy_mj"] <= energy_budget
    )


def stage_b_candidates(
    space: SearchSpace,
    front: Sequence[dict[str, Any]],
    baselines: Sequence[dict[str, Any]],
    k: int,
    latency_budget: float | None,
    energy_budget: float | None,
) -> list[dict[str, Any]]:
    """``k`` front designs spread along the front (the dense design excluded: its accuracy is known),
    preferring those within budget, plus the recipe and all-shift baselines."""
    dense_key = space.key(space.baselines()["all-mult"])
    pool = [r for r in front if space.key(r["params"]) != dense_key]
    feasible = [r for r in pool if _feasible(r, latency_budget, energy_budget)]
    pool = feasible or pool
    chosen = []
    if pool and k > 0:
        pts = np.array([[*_latencies(r), r["energy_mj"], r["risk"]] for r in pool])
        chosen = [pool[i] for i in pareto.spread(pts, k)]
    for name in ("recipe", "all-shift"):  # the report compares the chosen design with both
        base = next((b for b in baselines if b["baseline"] == name), None)
        if base is not None and all(space.key(r["params"]) != space.key(base["params"]) for r in chosen):
            chosen.append(base)
    return chosen


# ---------------------------------------------------------------------------------------------------
# Stage B


def _candidate_dir(space: SearchSpace, params: Mapping[str, str]) -> str:
    return hashlib.sha256(json.dumps(space.key(params)).encode()).hexdigest()[:12]


def run_stage_b(
    cfg: Config,
    out: Path,
    space: SearchSpace,
    candidates: Sequence[dict[str, Any]],
    costs: CostSource,
    storage_url: str,
    study_name: str,
    *,
    checkpoint: str | Path,
    data: Any = None,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Fine-tune each candidate briefly and record its validation accuracy in the stage-B study; a
    candidate already recorded there is not trained again. Returns the candidates with ``accuracy``,
    ``dense_accuracy``, ``feasible`` and ``stage_b_trial`` added."""
    s = cfg.search
    with quiet_optuna():
        _, study = open_study(
            storage_url, study_name + STAGE_B_SUFFIX, ["minimize", "minimize"], OBJECTIVES_B, space
        )
        study.sampler = optuna.samplers.RandomSampler(seed=cfg.seed)  # every trial is enqueued: no sampling
        done = {
            space.key(t.params): t
            for t in study.get_trials(deepcopy=False, states=[optuna.trial.TrialState.COMPLETE])
        }
    data = data if data is not None else load_data(cfg.data, cfg.seed)
    cfg_b = copy.deepcopy(cfg)
    cfg_b.finetune.epochs = s.stage_b_epochs
    cfg_b.finetune.warmup_epochs = min(cfg.finetune.warmup_epochs, max(0, s.stage_b_epochs - 1))
    results = []
    for cand in candidates:
        row = dict(cand)
        key = space.key(cand["params"])
        trial = done.get(key)
        if trial is None:
            folder = out / "stage_b" / _candidate_dir(space, cand["params"])
            folder.mkdir(parents=True, exist_ok=True)
            plan_path = space.assignment(cand["params"]).to_yaml(folder / "candidate.yaml")
            log.info(
                "stage B: fine-tuning trial %s (%s) for %d epoch(s) in %s",
                cand["trial"],
                cand.get("baseline") or "front",
                s.stage_b_epochs,
                folder,
            )
            summary = finetuning.finetune(
                cfg_b,
                folder,
                checkpoint=checkpoint,
                assignment=plan_path,
                costs=costs,
                resume=True,
                progress=progress,
                data=data,
            )
            with quiet_optuna():
                t = _ask_enqueued(study, space, cand["params"])
                if s.latency_budget_ms is not None:
                    t.set_constraint("latency_budget", cand["latency_ms"] - s.latency_budget_ms)
                if s.energy_budget_mj is not None:
                    t.set_constraint("energy_budget", cand["energy_mj"] - s.energy_budget_mj)
                attrs = {
                    "stage_a_trial": cand["trial"],
                    "energy_mj": cand["energy_mj"],
                    "risk": cand["risk"],
                    "baseline": cand.get("baseline", ""),
                    "dense_accuracy": summary["dense_val_acc"],
                    "epochs": s.stage_b_epochs,
                    "folder": str(folder),
                }
                for k, v in attrs.items():
                    t.set_user_attr(k, v)
                trial = study.tell(t, [-float(summary["val_acc"]), float(cand["latency_ms"])])
        row["accuracy"] = -float(trial.values[0])
        row["dense_accuracy"] = float(trial.user_attrs["dense_accuracy"])
        row["feasible"] = all(v <= 0 for v in trial.constraints.values()) if trial.constraints else True
        row["stage_b_trial"] = trial.number
        results.append(row)
    return results


def _ask_enqueued(study: Any, space: SearchSpace, params: Mapping[str, str]) -> Any:
    """A running trial of ``study`` with exactly ``params``. A trial left waiting in the queue by a process
    killed between enqueue and ask would be popped first; it is failed and the ask repeated."""
    study.enqueue_trial(dict(params))
    for _ in range(100):
        t = study.ask()  # the oldest waiting trial: ours, unless a stale one is ahead of it
        if space.suggest(t) == dict(params):
            return t
        study.tell(t, state=optuna.trial.TrialState.FAIL)
    raise StageError(
        f"cannot enqueue a stage-B trial in study '{study.study_name}'; its queue holds stale trials"
    )


# ---------------------------------------------------------------------------------------------------
# Choosing the design


def _changed(row: Mapping[str, Any]) -> int:
    """Layers a design reparameterises (shift, MoE or Hamming): the simpler design wins a tie."""
    return sum(int(row.get(f"n_{c}", 0)) for c in ("shift", "moe", "hamming"))


def choose(
    front: Sequence[dict[str, Any]],
    baselines: Sequence[dict[str, Any]],
    measured: Sequence[dict[str, Any]],
    *,
    max_drop: float,
    latency_budget: float | None,
    energy_budget: float | None,
) -> tuple[dict[str, Any] | None, str]:
    """The design for ``best_assignment.yaml`` and the rule that picked it (module docstring).

    The dense design (the all-mult baseline: the model compiled as it is) is always a candidate, with the dense
    accuracy and no fine-tuning, so a design it beats or equals on predicted latency and accuracy is never
    chosen; ties on latency go to the design that changes fewer layers.
    """
    dense = next((b for b in baselines if b["baseline"] == "all-mult"), None)
    if measured:
        dense_acc = measured[0]["dense_accuracy"]
        pool = list(measured)
        if dense is not None and all(r["trial"] != dense["trial"] for r in pool):
            pool.append(dict(dense, accuracy=dense_acc, dense_accuracy=dense_acc, feasible=True))
        feasible = [r for r in pool if r["feasible"] and _feasible(r, latency_budget, energy_budget)]
        note = ""
        if not feasible:
            feasible, note = pool, " (no candidate meets the budgets; budgets ignored)"
        within = [r for r in feasible if r["accuracy"] >= dense_acc - max_drop]
        if within:
            best = min(within, key=lambda r: (_speed_key(r), _changed(r), -r["accuracy"]))
            return best, (
                f"fastest predicted latency among stage-B candidates and the dense design within {max_drop:g} "
                f"points of the dense accuracy {dense_acc:.2f}%{note}"
            )
        best = max(feasible, key=lambda r: (r["accuracy"], -_speed_key(r), -_changed(r)))
        return best, (
            f"no candidate within {max_drop:g} points of the dense accuracy {dense_acc:.2f}%: the most "
            f"accurate{note}"
        )
    pool = [r for r in front if _feasible(r, latency_budget, energy_budget)] or list(front)
    if dense is not None and all(r["trial"] != dense["trial"] for r in pool):
        pool.append(dense)
    recipe = next((b for b in baselines if b["baseline"] == "recipe"), None)
    if not pool:
        return None, "no trials"
    if recipe is not None:
        safe = [r for r in pool if r["risk"] <= recipe["risk"] + 1e-12]
        if safe:
            best = min(safe, key=lambda r: (_speed_key(r), _changed(r), r["risk"]))
            return best, (
                "stage A only (no accuracy measured): fastest predicted latency among front designs and the "
                "dense design whose risk proxy is no higher than the ShiftAddViT recipe's"
            )
    best = min(pool, key=lambda r: (r["risk"], _speed_key(r), _changed(r)))
    return best, "stage A only: the lowest risk proxy on the front"


# ---------------------------------------------------------------------------------------------------
# Outputs


def write_pareto_csv(
    path: Path,
    space: SearchSpace,
    front: Sequence[dict[str, Any]],
    baselines: Sequence[dict[str, Any]],
    measured: Sequence[dict[str, Any]],
    chosen: dict[str, Any] | None,
    latency_budget: float | None,
    energy_budget: float | None,
    energy_source: str = "unknown",
) -> Path:
    """One row per front design, then the baselines not on the front, then measured candidates not on
    the front; stage-B accuracy where measured (energy labelled with its source); one column per search
    parameter."""
    import pandas as pd

    acc = {r["trial"]: r for r in measured}
    seen: set[int] = set()
    rows = []
    base_by_trial = {b["trial"]: b for b in baselines}

    def emit(r: dict[str, Any], source: str) -> None:
        if r["trial"] in seen:
            return
        seen.add(r["trial"])
        m = acc.get(r["trial"])
        b = base_by_trial.get(r["trial"])
        rows.append(
            {
                "trial": r["trial"],
                "source": source,
                "baseline": r.get("baseline", ""),
                "latency_ms": r["latency_ms"],
                **{k: v for k, v in r.items() if k.startswith("latency_ms@") or k == "latency_rel"},
                "energy_mj": r["energy_mj"],
                "energy_source": energy_source,
                "cost_source": r.get("cost_source", "unstated"),  # measured, or which figures are regressed
                "risk": r["risk"],
                "accuracy": m["accuracy"] if m else None,
                "dense_accuracy": m["dense_accuracy"] if m else None,
                "feasible": _feasible(r, latency_budget, energy_budget),
                "dominated_by": " ".join(map(str, b["dominated_by"])) if b and not b["on_front"] else "",
                "chosen": chosen is not None and chosen["trial"] == r["trial"],
                **{k: r[k] for k in r if k.startswith("n_")},
                **{p.name: r["params"][p.name] for p in space.params},
            }
        )

    for r in front:
        emit(r, "front")
    for r in baselines:
        emit(r, "baseline")
    for r in measured:
        emit(r, "stage_b")
    frame = pd.DataFrame(rows)
    return atomic_write_text(path, frame.to_csv(index=False))


# ---------------------------------------------------------------------------------------------------
# The command


def _sensitivity_key(
    cfg: Config, checkpoint: str | Path, kinds: Mapping[str, str], reparam: Mapping[str, Any]
) -> str:
    blob = {
        "checkpoint": sha256_file(checkpoint),
        "model": config_to_dict(cfg.model),
        "data": config_to_dict(cfg.data),
        "seed": cfg.seed,
        "samples": cfg.search.sensitivity_samples,
        "reparam": dict(reparam),
        "layers": list(kinds),
    }
    blob["model"].pop("checkpoint", None)
    return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()[:16]


def measure_risk(
    cfg: Config,
    out: Path,
    dense: Any,
    kinds: Mapping[str, str],
    checkpoint: str | Path,
    data: Any,
    progress: Callable[[str], None] | None = None,
):
    """The cached (or freshly measured) per-layer sensitivity of ``dense`` (:mod:`dse.search.sensitivity`)."""
    reparam = reparam_options(cfg)
    key = _sensitivity_key(cfg, checkpoint, kinds, reparam)

    def run():
        val = data.val
        n = cfg.search.sensitivity_samples
        if 0 < n < len(val):
            gen = torch.Generator().manual_seed(cfg.seed)
            val = Subset(val, torch.randperm(len(val), generator=gen)[:n].sort().values.tolist())
        return sensitivity.measure(
            dense,
            kinds,
            val,
            fit_batch(data, cfg),
            batch_size=cfg.data.eval_batch_size,
            reparam=reparam,
            progress=progress,
        )

    return sensitivity.load_or_measure(out / "sensitivity.json", key, run)


def _shift_share(costs: CostSource, kinds: Mapping[str, str], layer: str) -> float | None:
    """The Shift expert's token share at the balance loss's equilibrium (``1 -`` the Mult share)."""
    if kinds[layer] != "linear":
        return None
    try:
        c = costs.moe_expert_costs(layer)
    except (ProfileError, StageError, KeyError):  # a layer MoE cannot be priced for is never searched as moe
        return None
    return 1.0 - equilibrium_share(c)


def run_search(
    cfg: Config,
    out: Path | None = None,
    *,
    costs: CostSource | None = None,
    progress: Callable[[str], None] | None = None,
    train_progress: bool = False,
) -> dict[str, Any]:
    """``dse search`` end to end (module docstring); returns a JSON-able summary."""
    s = cfg.search
    out = Path(out or cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out)
    checkpoint = cfg.model.checkpoint
    if not checkpoint:
        raise ConfigError(
            "dse search needs the dense checkpoint for its accuracy-risk proxy: pass --checkpoint "
            "DENSE.pt or set model.checkpoint (`dse pretrain` writes one)"
        )
    storage_url = with_driver(s.storage or default_storage(out))
    dense, _ = load_dense(cfg, checkpoint)
    kinds = layer_kinds(dense)
    devices = [("", costs)] if costs is not None else load_device_costs(cfg, dense, s.profile)
    labels = [label for label, _ in devices] if len(devices) > 1 else []
    costs, others = devices[0][1], [c for _, c in devices[1:]]
    space = SearchSpace.build(kinds, s.freeze, s.tie, _searchable_choices(kinds, [costs, *others]))
    data = load_data(cfg.data, cfg.seed)
    summary: dict[str, Any] = {
        "storage": hide_password(storage_url),
        "study": s.study_name,
        "parameters": len(space),
        "layers": len(kinds),
        "pinned": len(space.pinned),
        "sampler": s.sampler,
        "population": s.population,
        "devices": [label for label, _ in devices if label] or None,  # the devices the latencies are for
        "energy_source": energy_label(costs),  # the (first) profile's: measured or analytical
    }
    if s.stage in ("a", "both"):
        sens, reused = measure_risk(cfg, out, dense, kinds, checkpoint, data, progress)
        summary["sensitivity"] = {
            "reused": reused,
            "seconds": round(sens.seconds, 1),
            "samples": sens.samples,
            "dense_loss": sens.base_loss,
            "dense_acc_subset": sens.base_acc,
        }
        objective = Objective(
            space, costs, risk_table(sens, kinds, lambda layer: _shift_share(costs, kinds, layer)), others
        )
        summary["stage_a"] = _stage_a_summary(cfg, space, objective, storage_url, labels, progress)
    trials = stored_trials(storage_url, s.study_name)
    if not trials:
        raise StageError(
            f"study '{s.study_name}' in {hide_password(storage_url)} has no stage-A trials; run --stage a first"
        )
    _check_space(space, trials, s.study_name)
    front, baselines, values = front_table(space, trials, labels)
    for row in (*front, *baselines):  # a design priced partly by regression says so wherever it is shown
        row["cost_source"] = provenance.design_source(costs, space.assignment(row["params"]))
    summary |= _trials_summary(space, trials, front, baselines)
    measured: list[dict[str, Any]] = []
    if s.stage in ("b", "both"):
        cands = stage_b_candidates(
            space, front, baselines, s.stage_b_candidates, s.latency_budget_ms, s.energy_budget_mj
        )
        measured = run_stage_b(cfg, out, space, cands, costs, storage_url, s.study_name, checkpoint=checkpoint,
                               data=data, progress=train_progress)
        keys = ("trial", "baseline", "latency_ms", "energy_mj", "risk", "accuracy", "dense_accuracy", "feasible")
        summary["stage_b"] = [{k: r[k] for k in keys} for r in measured]
    chosen, rule = choose(
        front,
        baselines,
        measured,
        max_drop=s.max_accuracy_drop,
        latency_budget=s.latency_budget_ms,
        energy_budget=s.energy_budget_mj,
    )
    _write_outputs(cfg, out, space, trials, values, front, baselines, measured, chosen, summary["energy_source"])
    if chosen is not None:
        summary["chosen"] = _chosen_summary(chosen)
    if labels:
        rule += (f"; 'fastest' over {len(labels)} devices: the least mean of each device's predicted latency "
                 "relative to the dense (all-mult) design there")
    summary["rule"] = rule
    summary["front"] = [_front_row_summary(r) for r in front]
    summary["outputs"] = {
        n: str(out / n)
        for n in ("pareto.csv", "pareto.png", "best_assignment.yaml", "sensitivity.json", "resolved_config.yaml")
    }
    atomic_write_text(out / "search.json", json.dumps(summary, indent=1, default=str))
    return summary


def _searchable_choices(kinds: Mapping[str, str], sources: Sequence[CostSource]) -> dict[str, tuple[str, ...]]:
    """{layer: choices} every cost source can price: a choice is searched only where every device prices it."""
    choices = priced_choices(sources[0], kinds)
    for other in sources[1:]:
        theirs = priced_choices(other, kinds)
        choices = {layer: tuple(c for c in ok if c in theirs[layer]) for layer, ok in choices.items()}
    return choices


def _stage_a_summary(cfg: Config, space: SearchSpace, objective: Objective, storage_url: str,
                     labels: Sequence[str], progress: Callable[[str], None] | None) -> dict[str, Any]:
    """Run stage A (:func:`run_stage_a`) with the config's settings; its part of the summary."""
    s = cfg.search
    res = run_stage_a(
        space,
        objective,
        storage_url,
        s.study_name,
        trials=s.trials,
        sampler=s.sampler,
        population=s.population,
        seed=cfg.seed,
        persist_every_s=s.persist_every_s,
        progress=progress,
        objectives=objective_names(labels),
    )
    return {
        "stored": res.stored,
        "evaluated": res.evaluated,
        "written": res.written,
        "seconds": round(res.seconds, 2),
        "trials_per_s": round(res.rate, 1),
        "worker": res.worker,
        "repeats_replaced": res.repeats,
    }


def _write_outputs(cfg: Config, out: Path, space: SearchSpace, trials: Sequence[Any], values: np.ndarray,
                   front: Sequence[dict[str, Any]], baselines: Sequence[dict[str, Any]],
                   measured: Sequence[dict[str, Any]], chosen: dict[str, Any] | None, energy_source: str) -> None:
    """``pareto.csv``, ``pareto.png`` and (when a design was chosen) ``best_assignment.yaml``."""
    s = cfg.search
    write_pareto_csv(out / "pareto.csv", space, front, baselines, measured, chosen, s.latency_budget_ms,
                     s.energy_budget_mj, energy_source)
    acc = {r["trial"]: r["accuracy"] for r in measured}
    pareto.plot_front(
        out / "pareto.png",
        values[:, [0, -2, -1]],  # the first device's latency, energy, risk
        [dict(r, accuracy=acc.get(r["trial"])) for r in front],
        [dict(b, accuracy=acc.get(b["trial"])) for b in baselines],
        chosen=chosen,
        latency_budget=s.latency_budget_ms,
        energy_budget=s.energy_budget_mj,
        title=f"{cfg.model.name}: {len(trials)} trials, {len(front)} on the front",
        energy_source=energy_source,
    )
    if chosen is not None:
        space.assignment(chosen["params"]).to_yaml(out / "best_assignment.yaml")


def _trials_summary(space: SearchSpace, trials: Sequence[Any], front: Sequence[dict[str, Any]],
                    baselines: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The stored trials' part of the summary: counts and where each baseline stands."""
    return {
        "trials": len(trials),
        "distinct_designs": len({space.key(t.params) for t in trials}),
        "front_size": len(front),
        "baselines": {
            b["baseline"]: {k: b.get(k) for k in ("trial", "on_front", "dominated_by", "latency_ms", "energy_mj", "risk",
                                                  "cost_source")}
            for b in baselines
        },
    }


def _front_row_summary(row: Mapping[str, Any]) -> dict[str, Any]:
    """One front design in the summary: objectives, per-device latencies and choice counts."""
    return ({k: row[k] for k in ("trial", "baseline", "latency_ms", "energy_mj", "risk", "cost_source") if k in row}
            | {k: v for k, v in row.items() if k.startswith("latency_ms@")}
            | {"counts": {k[2:]: v for k, v in row.items() if k.startswith("n_")}})


def _chosen_summary(chosen: Mapping[str, Any]) -> dict[str, Any]:
    """The chosen design's part of the summary: objectives, per-device latencies and choice counts."""
    row = {k: chosen.get(k) for k in ("trial", "baseline", "latency_ms", "energy_mj", "risk", "accuracy",
                                      "cost_source")}
    row |= {k: v for k, v in chosen.items() if k.startswith("latency_ms@") or k == "latency_rel"}
    row["counts"] = {k[2:]: v for k, v in chosen.items() if k.startswith("n_")}
    return row


__all__ = [
        "Objective",
    "StageAResult",
    "choose",
    "front_table",
    "open_study",
    "priced_choices",
    "run_search",
    "run_stage_a",
    "run_stage_b",
    "stage_b_candidates",
    "stored_trials",
    "write_pareto_csv",
]

