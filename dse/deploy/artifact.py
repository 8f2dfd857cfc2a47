"""The exported artifact folder: its format, its checksums, and a loader that needs only TVM and NumPy.

Layout (written by :mod:`dse.deploy.export`)::

    model.so         the compiled Relax VM library (code only: the weights are inputs)
    weights.npz      the parameters by state-dict name; shift layers as int8 ``shift`` and ``sign``
    assignment.yaml  the per-layer choices (and MoE capacities) the model was built with
    manifest.yaml    what it is, for which target, how it scored, and the sha256 of every other file

Loading a shared library runs its initialisers, so :meth:`Artifact.load` verifies every checksum
*before* it loads ``model.so``, and refuses the artifact (one-line :class:`ArtifactError`) on any
mismatch or missing file. This module must not import torch (or anything that does): an artifact is
deployed with ``tvm`` and ``numpy`` only; ``tests/dse/deploy/test_export.py`` runs it with torch poisoned.

The model is static: it takes exactly ``input.batch`` images (capacity-routed MoE layers choose tokens
across the whole batch, so a batch is the unit of computation); :meth:`Artifact.predict` pads the last
partial batch by repeating its final image and drops the padding from the result.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from dse.fileio import atomic_write_text, sha256_file
from dse.hardware.threads import use_all_cores
from kernels.compiled import library_has
from kernels.errors import ShiftAddError, TargetUnavailableError, UsageError

log = logging.getLogger(__name__)

FORMAT = "shiftadd-artifact/1"
MANIFEST = "manifest.yaml"
LIBRARY = "model.so"
WEIGHTS = "weights.npz"
ASSIGNMENT = "assignment.yaml"
REQUIRED = (LIBRARY, WEIGHTS, ASSIGNMENT)
SHIFT_ADD_PRIMITIVES = ("matshift", "matshift_decode", "matadd")


class ArtifactError(ShiftAddError):
    """An artifact folder is incomplete, modified, or from an incompatible format (exit 1)."""


class NotAnArtifactError(ArtifactError, UsageError):
    """The path given is not an artifact folder at all (exit 2: the user points at the wrong place)."""

    exit_code = 2


def read_manifest(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise NotAnArtifactError(f"{folder} is not an artifact folder (no {MANIFEST}); point --artifact at the "
                            "folder `dse export` wrote")
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ArtifactError(f"{path} cannot be read ({type(exc).__name__}); re-run `dse export`") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        found = data.get("format") if isinstance(data, dict) else None
        raise ArtifactError(f"{path} has format {found!r}, this loader reads {FORMAT!r}; re-run `dse export`")
    return data


def checksums(folder: str | Path, names: list[str] | None = None) -> dict[str, str]:
    """sha256 of the named files (default: every file in ``folder`` except the manifest)."""
    folder = Path(folder)
    if names is None:
        names = sorted(p.name for p in folder.iterdir() if p.is_file() and p.name != MANIFEST
                       and not p.name.startswith("."))
    return {name: sha256_file(folder / name) for name in names}


def write_manifest(folder: str | Path, manifest: Mapping[str, Any]) -> Path:
    """Write ``manifest.yaml`` with the checksums of every other file in ``folder`` (written last)."""
    data = {"format": FORMAT, **{k: v for k, v in manifest.items() if k not in ("format", "files")}}
    data["files"] = checksums(folder)
    missing = [n for n in REQUIRED if n not in data["files"]]
    if missing:
        raise ArtifactError(f"cannot finish the artifact in {folder}: {', '.join(missing)} missing")
    return atomic_write_text(Path(folder) / MANIFEST, yaml.safe_dump(_plain(data), sort_keys=False))


def manifest_digest(folder: str | Path) -> str:
    """The sha256 of the artifact's manifest: it covers every file through their checksums, so a deployment
    that pins it (``dse bench --expect-digest``) also refuses an artifact whose manifest was rewritten."""
    return sha256_file(Path(folder) / MANIFEST)


def verify(folder: str | Path, manifest: Mapping[str, Any] | None = None, expected_digest: str | None = None
           ) -> dict[str, Any]:
    """Check every file against the manifest's sha256 (and the manifest against ``expected_digest`` when one is
    pinned); returns the manifest or raises ArtifactError. The checksums beside the files catch damage; only a
    pinned digest, kept apart from the artifact, catches a deliberate change."""
    folder = Path(folder)
    if expected_digest is not None and (found := manifest_digest(folder)) != expected_digest.lower():
        raise ArtifactError(f"{folder / MANIFEST} has sha256 {found[:16]}…, not the pinned {expected_digest[:16]}…; "
                            "this is not the artifact that was exported, refusing to load it")
    manifest = dict(manifest) if manifest is not None else read_manifest(folder)
    files = manifest.get("files")
    if not isinstance(files, dict):
        raise ArtifactError(f"{folder / MANIFEST} lists no file checksums; re-run `dse export`")
    for name in REQUIRED:
        if name not in files:
            raise ArtifactError(f"{folder / MANIFEST} has no checksum for {name}; re-run `dse export`")
    for name, expected in files.items():
        path = folder / name
        if Path(name).name != name:
            raise ArtifactError(f"{folder / MANIFEST} names a file outside the folder ({name!r}); refusing it")
        if not path.is_file():
            raise ArtifactError(f"{path} is missing; the artifact is incomplete, re-run `dse export`")
        found = sha256_file(path)
        if found != expected:
            raise ArtifactError(f"{path} fails its checksum (sha256 {found[:12]}…, manifest says "
                                f"{str(expected)[:12]}…); the artifact was modified or damaged, refusing to "
                                "load it — re-run `dse export`")
    return manifest


def _plain(value: Any) -> Any:
    """NumPy scalars and tuples to plain YAML-safe Python."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, bool) or value is None:
        return value
    for kind in (str, int, float):  # also subclasses (TVM FFI strings and integers)
        if isinstance(value, kind):
            return kind(value)
    if isinstance(value, Path):
        return str(value)
    return value


@dataclasses.dataclass(frozen=True)
class LatencyStats:
    median_ms: float
    p90_ms: float
    repeats: int
    samples_ms: tuple[float, ...]

    @classmethod
    def from_ms(cls, samples: list[float]) -> LatencyStats:
        arr = np.asarray(samples, dtype=np.float64)
        return cls(float(np.median(arr)), float(np.percentile(arr, 90)), len(samples),
                   tuple(float(v) for v in arr))

    def as_dict(self) -> dict[str, Any]:
        return {"median_ms": self.median_ms, "p90_ms": self.p90_ms, "repeats": self.repeats}


def prepare_params(vm: Any, params: list[Any]) -> list[Any]:
    """The arguments ``main`` takes after the input: ``params`` themselves, or what the compiled
    ``main_transform_params`` makes of them once (the packed GEMM weights; see
    :func:`kernels.relax_pipeline.relax_pipeline`). The stored weights stay as exported (int8 shift layers)."""
    try:
        transform = vm["main_transform_params"]
    except Exception:  # compiled without lifted parameter transforms
        return params
    return list(transform(params))


class Artifact:
    """A verified, loaded artifact. ``run(batch)`` -> logits; ``predict(images)`` any number of images."""

    def __init__(self, folder: Path, manifest: dict[str, Any], vm: Any, device: Any, params: list[Any],
                 library: Any = None):
        self.folder = folder
        self.library = library  # the loaded TVM module the VM runs
        self.manifest = manifest
        self._vm = vm
        self._fn = vm["main"]
        self.device = device
        self._params = params
        spec = manifest["input"]
        self.input_shape = tuple(int(s) for s in spec["shape"])
        self.input_dtype = str(spec["dtype"])
        self.batch = int(spec["batch"])

    @classmethod
    def load(cls, folder: str | Path, expected_digest: str | None = None) -> Artifact:
        """Verify checksums (and the pinned manifest digest), then load the library and the weights onto the
        artifact's device."""
        import tvm
        from tvm import relax

        folder = Path(folder)
        manifest = verify(folder, expected_digest=expected_digest)
        kind = str((manifest.get("target") or {}).get("kind", "llvm"))
        if kind != "cuda":
            use_all_cores()
        if kind == "cuda":
            if not tvm.cuda(0).exist:
                raise TargetUnavailableError(f"{folder} was compiled for CUDA ({manifest.get('target_slug')}) and "
                                             "this machine has no CUDA device; run it on an NVIDIA GPU")
            device = tvm.cuda(0)
        else:
            device = tvm.cpu(0)
        names = [str(n) for n in manifest.get("params", [])]
        with np.load(folder / WEIGHTS, allow_pickle=False) as npz:
            missing = [n for n in names if n not in npz.files]
            if missing:
                raise ArtifactError(f"{folder / WEIGHTS} lacks {len(missing)} parameter(s) the model takes "
                                    f"(e.g. {missing[0]}); re-run `dse export`")
            params = [tvm.runtime.tensor(np.ascontiguousarray(npz[n]), device) for n in names]
        try:
            lib = tvm.runtime.load_module(str(folder / LIBRARY))
            vm = relax.VirtualMachine(lib, device)
        except Exception as exc:
            first = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
            raise ArtifactError(f"{folder / LIBRARY} does not load with this TVM ({first}); re-export with "
                                "the installed TVM version") from None
        return cls(folder, manifest, vm, device, prepare_params(vm, params), lib)

    def check_kernels(self) -> None:
        """Refuse (ArtifactError) an artifact whose manifest lists shift/add kernels its loaded library does not
        define: what it would run is not the model the manifest describes."""
        listed = [k for k in self.manifest.get("kernels") or () if k.get("primitive") in SHIFT_ADD_PRIMITIVES]
        missing = [k["function"] for k in listed if self.library is None or not library_has(self.library, k["function"])]
        if missing:
            pipeline = (self.manifest.get("library") or {}).get("pipeline", "an unrecorded pipeline")
            raise ArtifactError(f"{self.folder / LIBRARY} lacks {len(missing)} shift/add kernel(s) its manifest lists "
                                f"(e.g. {missing[0]}; compile pipeline {pipeline}); re-run `dse export`")

    @classmethod
    def in_memory(cls, executable: Any, params: list[np.ndarray], input_shape: tuple[int, ...], input_dtype: str,
                  device: Any = None) -> Artifact:
        """A freshly compiled ``relax.Executable`` run as a loaded artifact is, without writing its folder (the
        cost check compiles models only to time them): ``params`` in the order ``main`` takes them."""
        import tvm
        from tvm import relax

        device = device if device is not None else tvm.cpu(0)
        vm = relax.VirtualMachine(executable, device)
        tensors = [tvm.runtime.tensor(np.ascontiguousarray(p), device) for p in params]
        manifest = {"input": {"shape": list(input_shape), "dtype": input_dtype, "batch": int(input_shape[0])}}
        return cls(Path("<in memory>"), manifest, vm, device, prepare_params(vm, tensors))

    @property
    def vm(self) -> Any:
        """The ``relax.VirtualMachine`` (for :func:`kernels.instrument.time_calls`)."""
        return self._vm

    # ---- running ------------------------------------------------------------------------------------
    def _input(self, images: np.ndarray) -> Any:
        import tvm

        images = np.ascontiguousarray(images, dtype=self.input_dtype)
        if tuple(images.shape) != self.input_shape:
            raise ArtifactError(f"the model takes input {list(self.input_shape)}, got {list(images.shape)}; "
                                "use predict() for other numbers of images")
        return tvm.runtime.tensor(images, self.device)

    def _call(self, inp: Any) -> Any:
        out = self._fn(inp, *self._params)
        return out[0] if not hasattr(out, "numpy") else out

    def run(self, images: np.ndarray) -> np.ndarray:
        """Logits of exactly one batch (``input.shape``)."""
        return self._call(self._input(images)).numpy()

    def predict(self, images: np.ndarray) -> np.ndarray:
        """Logits of any number of images, one static batch at a time (module docstring: padding)."""
        images = np.asarray(images)
        if images.ndim != len(self.input_shape) or tuple(images.shape[1:]) != self.input_shape[1:]:
            raise ArtifactError(f"images must have shape [N, {', '.join(map(str, self.input_shape[1:]))}], "
                                f"got {list(images.shape)}")
        outs = []
        for start in range(0, len(images), self.batch):
            chunk = images[start:start + self.batch]
            real = len(chunk)
            if real < self.batch:
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], self.batch - real, axis=0)])
            outs.append(self.run(chunk)[:real])
        return np.concatenate(outs) if outs else np.zeros((0,), dtype=np.float32)

    def time(self, images: np.ndarray | None = None, *, repeat: int = 30, warmup: int = 5) -> LatencyStats:
        """Wall time of one batch (host to host, including the output's device sync), ``repeat`` samples."""
        if images is None:
            images = np.random.default_rng(0).standard_normal(self.input_shape).astype(self.input_dtype)
        inp = self._input(images)
        return LatencyStats.from_ms(self.sample_ms(inp, repeat=repeat, warmup=warmup))

    def sample_ms(self, inp: Any, *, repeat: int, warmup: int = 0) -> list[float]:
        """Per-call wall times in ms of ``repeat`` calls on an already-placed input tensor."""
        for _ in range(warmup):
            self._call(inp).numpy()
        samples = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            self._call(inp).numpy()  # .numpy() waits for the device and copies the logits back
            samples.append((time.perf_counter() - t0) * 1e3)
        return samples

    def device_input(self, images: np.ndarray) -> Any:
        return self._input(images)
