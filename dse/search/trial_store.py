"""Bulk persistence of finished Optuna trials in an RDB storage (SQLite, PostgreSQL, MySQL).

Why this exists: the cost-only search stage evaluates thousands of trials per minute in an in-memory
study, and Optuna's ``Study.add_trials`` writes each trial's parameters one ORM round-trip at a time
(a few trials per second with 40 categorical parameters on SQLite). :class:`TrialStore` writes a batch
of finished trials in one transaction with SQLAlchemy Core ``executemany`` inserts and reads back only
the trials it has not seen yet, so several workers can share one study.

The rows written are exactly the ones Optuna's ``RDBStorage._create_new_trial`` writes for a template
trial (tables ``trials``, ``trial_params``, ``trial_values``, ``trial_user_attributes``,
``trial_system_attributes``; datetimes as naive UTC); ``tests/dse/search/test_search.py`` checks the round trip
against Optuna's own reader and writer. Trial numbers stay unique and gap-free under concurrency because
every write first locks the study row (a no-op ``UPDATE``; Optuna's writer takes ``SELECT ... FOR UPDATE``
on the same row, so the two kinds of writers exclude each other; on SQLite the ``UPDATE`` takes the
database write lock), then numbers its trials from the study's current trial count, as Optuna does.

This touches Optuna's table layout (``optuna.storages._rdb.models``), which is versioned by Optuna's
schema migrations; the import is checked once and a mismatch is a one-line error naming the version.
"""

from __future__ import annotations

import datetime
import json
import logging
import random
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import optuna
from optuna.distributions import BaseDistribution, distribution_to_json, json_to_distribution
from optuna.trial import FrozenTrial, TrialState

from dse.config import hide_password
from dse.errors import ConfigError, StageError

log = logging.getLogger(__name__)

T = TypeVar("T")

WORKERS_KEY = "dse:workers"  # study system attribute: how many search processes have registered


def _models():
    try:
        from optuna.storages._rdb import models
    except ImportError as exc:  # pragma: no cover - depends on the installed optuna
        raise StageError(
            f"optuna {optuna.__version__} has no RDB models module ({exc}); install optuna>=5,<6"
        ) from None
    needed = (
        "StudyModel",
        "TrialModel",
        "TrialParamModel",
        "TrialValueModel",
        "TrialUserAttributeModel",
        "TrialSystemAttributeModel",
        "StudySystemAttributeModel",
    )
    missing = [n for n in needed if not hasattr(models, n)]
    if missing:  # pragma: no cover
        raise StageError(
            f"optuna {optuna.__version__} changed its RDB schema (no {', '.join(missing)}); "
            "install optuna>=5,<6"
        ) from None
    return models


def _utc(dt: datetime.datetime | None) -> datetime.datetime | None:
    # Optuna stores naive UTC and hands out naive local time (TrialModel.datetime_start).
    return None if dt is None else dt.astimezone(datetime.UTC).replace(tzinfo=None)


def _local(dt: datetime.datetime | None) -> datetime.datetime | None:
    return None if dt is None else dt.replace(tzinfo=datetime.UTC).astimezone().replace(tzinfo=None)


def with_driver(url: str) -> str:
    """``postgresql://`` names SQLAlchemy 2.1's default driver, psycopg 3; when only psycopg2 (the
    ``psycopg2-binary`` package) is installed, name it explicitly."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            try:
                import psycopg  # noqa: F401
            except ImportError:
                try:
                    import psycopg2  # noqa: F401
                except ImportError:
                    return url
                return "postgresql+psycopg2://" + url[len(prefix) :]
    return url


def open_storage(url: str, retries: int = 5) -> optuna.storages.RDBStorage:
    """An :class:`optuna.storages.RDBStorage` for ``url``, tolerant of several workers creating the schema
    of a fresh database at the same moment (the loser of that race gets an integrity error; retry)."""
    from sqlalchemy import exc as sa_exc

    url = with_driver(url)
    kwargs: dict[str, Any] = {}
    if url.startswith("sqlite"):
        kwargs["connect_args"] = {"timeout": 120}  # wait for another writer instead of failing fast
    for attempt in range(retries):
        try:
            return optuna.storages.RDBStorage(url, engine_kwargs=kwargs)
        except (sa_exc.ArgumentError, sa_exc.NoSuchModuleError, ImportError) as exc:
            raise ConfigError(
                f"invalid storage URL {hide_password(url)!r} ({hide_password(str(exc).splitlines()[0])}); use e.g. "
                "sqlite:///study.db or postgresql://user@host/db"
            ) from None
        except Exception as exc:  # sqlalchemy raises a variety of errors for a concurrent create_all
            # PostgreSQL says "already exists"/"duplicate key", SQLite "UNIQUE constraint failed" (both
            # workers inserting alembic_version): seen when a reader opened a study its worker was creating
            racing = any(s in str(exc).lower() for s in ("already exists", "duplicate", "unique constraint"))
            if attempt == retries - 1 or not racing:
                raise StageError(f"cannot open Optuna storage {hide_password(url)}: "
                                 f"{hide_password(str(exc).splitlines()[0])}") from None
            time.sleep(0.2 + random.random())
    raise AssertionError("unreachable")  # pragma: no cover


class TrialStore:
    """Batch writer and incremental reader of one study's finished trials in an RDB storage."""

    def __init__(self, storage: optuna.storages.RDBStorage, study_name: str):
        self._m = _models()
        self.storage = storage
        self.engine = storage.engine
        self.study_name = study_name
        studies = self._m.StudyModel.__table__
        from sqlalchemy import select

        with self.engine.connect() as conn:
            study_id = conn.scalar(select(studies.c.study_id).where(studies.c.study_name == study_name))
        if study_id is None:
            raise StageError(f"study '{study_name}' does not exist in {hide_password(str(storage.url))}; create it first")
        self.study_id: int = study_id
        self._seen_max_id = -1  # trials with ids up to here have been read (or were written by us)
        self._own_ids: set[int] = set()
        self._dist_cache: dict[str, BaseDistribution] = {}

    # ---- locking ------------------------------------------------------------------------------------
    def _locked(self, fn: Callable[[Any], T], retries: int = 8) -> T:
        """Run ``fn(conn)`` in one transaction holding the study-row lock; retried on lock timeouts and
        deadlocks (both roll back the whole transaction, so a retry cannot duplicate rows)."""
        from sqlalchemy import exc as sa_exc
        from sqlalchemy import update

        studies = self._m.StudyModel.__table__
        for attempt in range(retries):
            try:
                with self.engine.begin() as conn:
                    conn.execute(
                        update(studies)
                        .where(studies.c.study_id == self.study_id)
                        .values(study_name=studies.c.study_name)
                    )
                    return fn(conn)
            except sa_exc.OperationalError as exc:
                if attempt == retries - 1:
                    raise StageError(
                        f"cannot write to the study storage: {str(exc).splitlines()[0]}"
                    ) from None
                log.warning("storage busy (%s); retrying", str(exc).splitlines()[0])
                time.sleep(0.1 * 2**attempt * (0.5 + random.random()))
        raise AssertionError("unreachable")  # pragma: no cover

    # ---- workers ------------------------------------------------------------------------------------
    def register_worker(self) -> int:
        """A number unique to this process among all that ever searched this study (0, 1, 2, ...): it
        seeds the sampler, so concurrent workers explore different trials."""
        from sqlalchemy import insert, select, update

        attrs = self._m.StudySystemAttributeModel.__table__

        def bump(conn) -> int:
            where = (attrs.c.study_id == self.study_id) & (attrs.c.key == WORKERS_KEY)
            raw = conn.scalar(select(attrs.c.value_json).where(where))
            index = json.loads(raw) if raw is not None else 0
            if raw is None:
                conn.execute(
                    insert(attrs).values(
                        study_id=self.study_id, key=WORKERS_KEY, value_json=json.dumps(index + 1)
                    )
                )
            else:
                conn.execute(update(attrs).where(where).values(value_json=json.dumps(index + 1)))
            return index

        return self._locked(bump)

    # ---- writing ------------------------------------------------------------------------------------
    def write(self, trials: Sequence[FrozenTrial], unique_attr: str | None = None) -> list[FrozenTrial]:
        """Append finished trials in one transaction; returns them as stored (numbers assigned).

        ``unique_attr``: a trial carrying this user attribute is skipped when the study already holds a
        trial with the same value of it (e.g. each baseline is stored once however many workers ran it).
        """
        for t in trials:
            if not t.state.is_finished():
                raise StageError(f"trial {t.number} is {t.state.name}; only finished trials can be stored")
            if t.intermediate_values:
                raise StageError("trials with intermediate values are not supported by the bulk writer")
        if not trials:
            return []
        return self._locked(lambda conn: self._write(conn, list(trials), unique_attr))

    def _write(self, conn, trials: list[FrozenTrial], unique_attr: str | None) -> list[FrozenTrial]:
        from sqlalchemy import func, insert, select

        m = self._m
        t_trials = m.TrialModel.__table__
        if unique_attr is not None and any(unique_attr in t.user_attrs for t in trials):
            trials = self._not_stored(conn, trials, unique_attr)
            if not trials:
                return []
        base = conn.scalar(
            select(func.count()).select_from(t_trials).where(t_trials.c.study_id == self.study_id)
        )
        now = datetime.datetime.now()
        rows = [
            {
                "number": base + i,
                "study_id": self.study_id,
                "state": t.state,
                "datetime_start": _utc(t.datetime_start or now),
                "datetime_complete": _utc(t.datetime_complete or now),
            }
            for i, t in enumerate(trials)
        ]
        ids = (
            conn.execute(insert(t_trials).returning(t_trials.c.trial_id, sort_by_parameter_order=True), rows)
            .scalars()
            .all()
        )
        tables = (
            m.TrialParamModel.__table__,
            m.TrialValueModel.__table__,
            m.TrialUserAttributeModel.__table__,
            m.TrialSystemAttributeModel.__table__,
        )
        for table, batch in zip(tables, self._detail_rows(ids, trials)):
            if batch:
                conn.execute(insert(table), batch)
        self._own_ids.update(ids)
        return [
            FrozenTrial(
                number=base + i,
                state=t.state,
                value=None,
                values=t.values,
                datetime_start=t.datetime_start or now,
                datetime_complete=t.datetime_complete or now,
                params=t.params,
                distributions=t.distributions,
                user_attrs=t.user_attrs,
                system_attrs=t.system_attrs,
                intermediate_values={},
                trial_id=trial_id,
            )
            for i, (trial_id, t) in enumerate(zip(ids, trials))
        ]

    def _not_stored(self, conn, trials: list[FrozenTrial], unique_attr: str) -> list[FrozenTrial]:
        """``trials`` less those whose ``unique_attr`` value the study (or an earlier trial of the batch) holds."""
        from sqlalchemy import select

        t_trials, t_user = self._m.TrialModel.__table__, self._m.TrialUserAttributeModel.__table__
        stored = (
            conn.execute(
                select(t_user.c.value_json)
                .join(t_trials, t_user.c.trial_id == t_trials.c.trial_id)
                .where(t_trials.c.study_id == self.study_id, t_user.c.key == unique_attr)
            )
            .scalars()
            .all()
        )
        present = set(stored)
        keep = []
        for t in trials:
            key = json.dumps(t.user_attrs[unique_attr]) if unique_attr in t.user_attrs else None
            if key is None or key not in present:
                keep.append(t)
                if key is not None:
                    present.add(key)
        return keep

    def _detail_rows(self, ids: Sequence[int], trials: list[FrozenTrial]) -> tuple[list[dict], ...]:
        """The rows of ``trial_params``, ``trial_values``, ``trial_user_attributes`` and
        ``trial_system_attributes`` for the trials inserted with ``ids``."""
        params, values, user, system = [], [], [], []
        dist_json: dict[int, str] = {}
        for trial_id, t in zip(ids, trials):
            for name, value in t.params.items():
                dist = t.distributions[name]
                js = dist_json.get(id(dist))
                if js is None:
                    js = dist_json[id(dist)] = distribution_to_json(dist)
                params.append(
                    {
                        "trial_id": trial_id,
                        "param_name": name,
                        "param_value": dist.to_internal_repr(value),
                        "distribution_json": js,
                    }
                )
            for objective, value in enumerate(t.values or ()):
                stored, kind = self._m.TrialValueModel.value_to_stored_repr(value)
                values.append(
                    {"trial_id": trial_id, "objective": objective, "value": stored, "value_type": kind}
                )
            user += [
                {"trial_id": trial_id, "key": k, "value_json": json.dumps(v)} for k, v in t.user_attrs.items()
            ]
            system += [
                {"trial_id": trial_id, "key": k, "value_json": json.dumps(v)}
                for k, v in t.system_attrs.items()
            ]
        return params, values, user, system

    # ---- reading ------------------------------------------------------------------------------------
    def count(self, states: Sequence[TrialState] = (TrialState.COMPLETE,)) -> int:
        from sqlalchemy import func, select

        t = self._m.TrialModel.__table__
        with self.engine.connect() as conn:
            return conn.scalar(
                select(func.count())
                .select_from(t)
                .where(t.c.study_id == self.study_id, t.c.state.in_(list(states)))
            )

    def read_new(self, states: Sequence[TrialState] = (TrialState.COMPLETE,)) -> list[FrozenTrial]:
        """Trials in ``states`` that this store has neither read nor written before, ordered by number.

        Ids only grow across committed writes (every writer holds the study lock while inserting), so
        "newer than the largest id seen" finds everything another worker added since the last read.
        """
        from sqlalchemy import select

        m = self._m
        t_trials, t_params, t_values = (
            m.TrialModel.__table__,
            m.TrialParamModel.__table__,
            m.TrialValueModel.__table__,
        )
        t_user, t_sys = m.TrialUserAttributeModel.__table__, m.TrialSystemAttributeModel.__table__
        cond = (
            (t_trials.c.study_id == self.study_id)
            & (t_trials.c.trial_id > self._seen_max_id)
            & t_trials.c.state.in_(list(states))
        )
        with self.engine.connect() as conn:
            head = conn.execute(
                select(
                    t_trials.c.trial_id,
                    t_trials.c.number,
                    t_trials.c.state,
                    t_trials.c.datetime_start,
                    t_trials.c.datetime_complete,
                )
                .where(cond)
                .order_by(t_trials.c.trial_id)
            ).all()
            head = [h for h in head if h.trial_id not in self._own_ids]
            if not head:
                self._advance(conn)
                return []
            wanted = {h.trial_id for h in head}
            fields: dict[int, dict[str, Any]] = {
                i: {"params": {}, "dists": {}, "values": {}, "user": {}, "sys": {}} for i in wanted
            }

            def rows(table, *cols):
                return conn.execute(
                    select(*cols).join(t_trials, table.c.trial_id == t_trials.c.trial_id).where(cond)
                ).all()

            for r in rows(
                t_params,
                t_params.c.trial_id,
                t_params.c.param_name,
                t_params.c.param_value,
                t_params.c.distribution_json,
            ):
                if r.trial_id in wanted:
                    dist = self._dist_cache.get(r.distribution_json)
                    if dist is None:
                        dist = self._dist_cache[r.distribution_json] = json_to_distribution(
                            r.distribution_json
                        )
                    f = fields[r.trial_id]
                    f["params"][r.param_name] = dist.to_external_repr(r.param_value)
                    f["dists"][r.param_name] = dist
            for r in rows(
                t_values, t_values.c.trial_id, t_values.c.objective, t_values.c.value, t_values.c.value_type
            ):
                if r.trial_id in wanted:
                    fields[r.trial_id]["values"][r.objective] = m.TrialValueModel.stored_repr_to_value(
                        r.value, r.value_type
                    )
            for table, key in ((t_user, "user"), (t_sys, "sys")):
                for r in rows(table, table.c.trial_id, table.c.key, table.c.value_json):
                    if r.trial_id in wanted:
                        fields[r.trial_id][key][r.key] = json.loads(r.value_json)
            self._seen_max_id = max(self._seen_max_id, max(wanted))
            self._advance(conn)
        out = []
        for h in head:
            f = fields[h.trial_id]
            vals = [f["values"][k] for k in sorted(f["values"])] or None
            out.append(
                FrozenTrial(
                    number=h.number,
                    state=h.state,
                    value=None,
                    values=vals,
                    datetime_start=_local(h.datetime_start),
                    datetime_complete=_local(h.datetime_complete),
                    params=f["params"],
                    distributions=f["dists"],
                    user_attrs=f["user"],
                    system_attrs=f["sys"],
                    intermediate_values={},
                    trial_id=h.trial_id,
                )
            )
        out.sort(key=lambda t: t.number)
        return out

    def _advance(self, conn) -> None:
        # Our own writes are "seen" too; forget their ids once the high-water mark passes them.
        if self._own_ids:
            self._seen_max_id = max(self._seen_max_id, max(self._own_ids))
            self._own_ids.clear()
