"""The project's one door to NVIDIA's management library (NVML, via the ``pynvml`` module).

No other module imports ``pynvml``: everything NVML goes through :class:`Nvml`, which loads the
module lazily through :func:`load_pynvml` (the test seam: inject a fake with
``monkeypatch.setitem(sys.modules, "pynvml", fake)``) and turns every ``NVMLError`` into one of the
project's errors with a one-line message. Device indices given to this module are *CUDA* indices (as
torch and TVM number GPUs) and are mapped to NVML indices through ``CUDA_VISIBLE_DEVICES``, because
NVML ignores that variable.
"""

from __future__ import annotations

import logging
import os
from types import ModuleType
from typing import Any, Self

from kernels.errors import ShiftAddError, TargetUnavailableError

logger = logging.getLogger(__name__)

# NVML return codes (nvml.h); read from the module when it defines them, these are the fallbacks.
_CODE_DEFAULTS = {
    "NVML_ERROR_NO_PERMISSION": 4,
    "NVML_ERROR_NOT_SUPPORTED": 3,
    "NVML_ERROR_DRIVER_NOT_LOADED": 9,
    "NVML_ERROR_LIBRARY_NOT_FOUND": 12,
    "NVML_ERROR_FUNCTION_NOT_FOUND": 13,
    "NVML_ERROR_LIB_RM_VERSION_MISMATCH": 18,
    "NVML_DEVICE_ARCH_VOLTA": 5,
}

# nvmlDeviceArchitecture_t values (nvml.h); the energy counter exists from Volta on (Zeus checks the same).
_ARCH_NAMES = {
    2: "kepler",
    3: "maxwell",
    4: "pascal",
    5: "volta",
    6: "turing",
    7: "ampere",
    8: "ada",
    9: "hopper",
    10: "blackwell",
    13: "rubin",
}


class NvmlError(ShiftAddError):
    """An NVML call failed; ``code`` is the NVML return code when there was one."""

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(_one_line(message))
        self.code = code


class NvmlUnavailableError(NvmlError, TargetUnavailableError):
    """NVML cannot be used here at all: no package, no driver library, no such GPU."""


class NvmlNotSupportedError(NvmlError):
    """This GPU or driver does not provide the requested query (e.g. the energy counter before Volta)."""


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def load_pynvml() -> ModuleType:
    """Import ``pynvml`` on first use (the seam tests replace through ``sys.modules``)."""
    try:
        import pynvml  # noqa: PLC0415 - deliberately lazy: importing must not need a GPU
    except ImportError as exc:
        raise NvmlUnavailableError(
            f"the pynvml module is missing ({exc}); install it with `pip install nvidia-ml-py`"
        ) from exc
    return pynvml


def architecture_name(code: int) -> str:
    """Lower-case architecture name for an ``nvmlDeviceGetArchitecture`` value ("unknown" otherwise)."""
    return _ARCH_NAMES.get(int(code), "unknown")


class Nvml:
    """An NVML session: ``with Nvml() as nv: nv.total_energy_mj(0)``.

    ``nvmlInit``/``nvmlShutdown`` are reference counted by the driver library, so sessions may nest.
    """

    def __init__(self) -> None:
        self._nv: ModuleType | None = None
        self._handles: dict[int, Any] = {}

    # -- lifecycle ---------------------------------------------------------------------------------
    def open(self) -> Self:
        if self._nv is None:
            nv = load_pynvml()
            self._call_module(nv, "nvmlInit", what="initialise NVML")
            self._nv = nv
        return self

    def close(self) -> None:
        if self._nv is None:
            return
        nv, self._nv = self._nv, None
        self._handles.clear()
        try:
            nv.nvmlShutdown()
        except Exception as exc:  # noqa: BLE001 - shutting down must never mask the real outcome
            logger.debug("nvmlShutdown failed: %s", exc)

    def __enter__(self) -> Self:
        return self.open()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- queries -----------------------------------------------------------------------------------
    def device_count(self) -> int:
        return int(self._call("nvmlDeviceGetCount", what="count GPUs"))

    def name(self, index: int) -> str:
        return _text(
            self._call("nvmlDeviceGetName", self._handle(index), what=f"read the name of GPU {index}")
        )

    def uuid(self, index: int) -> str:
        return _text(
            self._call("nvmlDeviceGetUUID", self._handle(index), what=f"read the UUID of GPU {index}")
        )

    def driver_version(self) -> str:
        return _text(self._call("nvmlSystemGetDriverVersion", what="read the driver version"))

    def cuda_driver_version(self) -> str | None:
        """The CUDA version the driver supports, e.g. ``"12.4"`` (None when NVML cannot say)."""
        try:
            raw = int(self._call("nvmlSystemGetCudaDriverVersion", what="read the CUDA driver version"))
        except NvmlNotSupportedError:
            return None
        # NVML encodes it as 1000*major + 10*minor (nvml.h, NVML_CUDA_DRIVER_VERSION_MAJOR/MINOR).
        return f"{raw // 1000}.{(raw % 1000) // 10}"

    def architecture(self, index: int) -> int | None:
        """``nvmlDeviceGetArchitecture`` code, or None where the driver predates that query."""
        try:
            return int(
                self._call(
                    "nvmlDeviceGetArchitecture",
                    self._handle(index),
                    what=f"read the architecture of GPU {index}",
                )
            )
        except NvmlNotSupportedError:
            return None

    def total_energy_mj(self, index: int) -> int:
        """Energy counter in mJ since the driver was loaded (Volta and newer; updates about every 100 ms)."""
        return int(
            self._call(
                "nvmlDeviceGetTotalEnergyConsumption",
                self._handle(index),
                what=f"read the energy counter of GPU {index}",
            )
        )

    def power_mw(self, index: int) -> int:
        """Board power in mW (an average over up to 1 s on GPUs newer than GA100, Zeus issue #45)."""
        return int(
            self._call("nvmlDeviceGetPowerUsage", self._handle(index), what=f"read the power of GPU {index}")
        )

    def has_energy_counter(self, index: int) -> bool:
        """Whether ``total_energy_mj`` works on this GPU: Volta or newer and the driver answers."""
        arch = self.architecture(index)
        if arch is not None and arch < self._const("NVML_DEVICE_ARCH_VOLTA"):
            return False
        try:
            self.total_energy_mj(index)
        except NvmlNotSupportedError:
            return False
        return True

    def index_for_cuda_device(self, cuda_index: int) -> int:
        """NVML index of the GPU that CUDA calls ``cuda_index``, honouring ``CUDA_VISIBLE_DEVICES``.

        Assumes CUDA enumerates in PCI order like NVML (true for identical GPUs; set
        ``CUDA_DEVICE_ORDER=PCI_BUS_ID`` on mixed machines).
        """
        if cuda_index < 0:
            raise NvmlUnavailableError(f"GPU index must be >= 0, got {cuda_index}")
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        count = self.device_count()
        if visible is None:
            index = cuda_index
        else:
            entries = [e.strip() for e in visible.split(",") if e.strip()]
            if cuda_index >= len(entries):
                raise NvmlUnavailableError(
                    f"CUDA device {cuda_index} is not visible (CUDA_VISIBLE_DEVICES={visible!r}); "
                    "pick a visible device index or change CUDA_VISIBLE_DEVICES"
                )
            index = self._resolve_visible_entry(entries[cuda_index], count)
        if index >= count:
            raise NvmlUnavailableError(
                f"GPU {index} does not exist: NVML sees {count} GPU(s); pick an index below {count}"
            )
        return index

    # -- internals ---------------------------------------------------------------------------------
    def _resolve_visible_entry(self, entry: str, count: int) -> int:
        if entry.isdigit():
            return int(entry)
        if entry.startswith("MIG-"):
            raise NvmlUnavailableError(
                f"CUDA_VISIBLE_DEVICES names a MIG instance ({entry}); NVML energy is per physical GPU, "
                "so measure on a whole GPU"
            )
        for index in range(count):  # CUDA accepts a UUID prefix, so compare prefixes
            if self.uuid(index).startswith(entry):
                return index
        raise NvmlUnavailableError(
            f"no GPU matches CUDA_VISIBLE_DEVICES entry {entry!r}; check `nvidia-smi -L`"
        )

    def _const(self, name: str) -> int:
        return int(getattr(self._nv, name, _CODE_DEFAULTS[name]))

    def _handle(self, index: int) -> Any:
        if index not in self._handles:
            self._handles[index] = self._call("nvmlDeviceGetHandleByIndex", index, what=f"open GPU {index}")
        return self._handles[index]

    def _call(self, fn_name: str, *args: Any, what: str) -> Any:
        if self._nv is None:
            raise NvmlError(f"NVML session is not open (cannot {what}); call Nvml.open() first")
        return self._call_module(self._nv, fn_name, *args, what=what)

    @staticmethod
    def _call_module(nv: ModuleType, fn_name: str, *args: Any, what: str) -> Any:
        fn = getattr(nv, fn_name, None)
        if fn is None:
            raise NvmlNotSupportedError(f"this pynvml has no {fn_name}, so it cannot {what}")
        nvml_error = getattr(nv, "NVMLError", None)
        try:
            return fn(*args)
        except Exception as exc:
            if nvml_error is not None and isinstance(exc, nvml_error):
                raise translate_error(nv, exc, what) from exc
            raise


def translate_error(nv: ModuleType, exc: BaseException, what: str) -> NvmlError:
    """Map an ``NVMLError`` to the project's error types, with a one-line message."""
    code = getattr(exc, "value", None)
    try:
        text = _one_line(str(exc)) or f"NVML error {code}"
    except Exception:  # noqa: BLE001 - pynvml's __str__ itself calls into the library
        text = f"NVML error {code}"

    def const(name: str) -> int:
        return int(getattr(nv, name, _CODE_DEFAULTS[name]))

    if code in (const("NVML_ERROR_NOT_SUPPORTED"), const("NVML_ERROR_FUNCTION_NOT_FOUND")):
        return NvmlNotSupportedError(f"NVML cannot {what} on this GPU/driver ({text})", code)
    if code in (
        const("NVML_ERROR_LIBRARY_NOT_FOUND"),
        const("NVML_ERROR_DRIVER_NOT_LOADED"),
        const("NVML_ERROR_LIB_RM_VERSION_MISMATCH"),
        const("NVML_ERROR_NO_PERMISSION"),
    ):
        return NvmlUnavailableError(f"NVML is unavailable here ({text}), so it cannot {what}", code)
    return NvmlError(f"NVML failed to {what} ({text})", code)


def _text(value: Any) -> str:
    # pynvml returned bytes before 11.5 and str since; accept both.
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def device_count() -> int:
    """Number of GPUs NVML sees (all of them, whatever ``CUDA_VISIBLE_DEVICES`` says); raises NvmlError."""
    with Nvml() as nv:
        return nv.device_count()


def probe(cuda_index: int = 0) -> str | None:
    """None when NVML can read GPU ``cuda_index`` here, else the one-line reason it cannot. Never raises."""
    try:
        with Nvml() as nv:
            nv.index_for_cuda_device(cuda_index)
    except ShiftAddError as exc:
        return str(exc)
    except Exception as exc:  # noqa: BLE001 - a probe reports, it does not fail
        return _one_line(f"NVML probe failed unexpectedly: {type(exc).__name__}: {exc}")
    return None
