"""A stand-in for the ``pynvml`` module (nvidia-ml-py), with knobs to inject failures.

Shapes come from the installed pynvml itself: the plain-data ctypes structs it returns
(``c_nvmlFieldValue_t``, ``c_nvmlMemory_t``, ``c_nvmlUtilization_t``, ``c_nvmlGpmSupport_t``)
and ``nvmlFriendlyObject`` are the real classes, every error raised is the real
``pynvml.NVMLError`` subclass (built from its code the way pynvml does), and ``NVML_*``
constants and error classes are read from the real module. Only GPM sample handles and the
metrics-get request are imitated: the real ones hold opaque pointers into the driver.
All values are synthetic.
"""

from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import pynvml as real

GIB = 1 << 30
#: A hung call gives up after this long so a broken test cannot hang the suite.
HANG_LIMIT_S = 10.0

_VALUE_MEMBER = {
    real.NVML_VALUE_TYPE_DOUBLE: "dVal",
    real.NVML_VALUE_TYPE_UNSIGNED_INT: "uiVal",
    real.NVML_VALUE_TYPE_UNSIGNED_LONG_LONG: "ullVal",
}
_VALUE_MODULUS = {real.NVML_VALUE_TYPE_UNSIGNED_INT: 1 << 32}


@dataclass
class FakeMig:
    """One MIG instance on a fake GPU."""

    gpu_instance_id: int
    compute_instance_id: int
    uuid: str
    profile: str  # e.g. "1g.10gb"


@dataclass
class FakeGpu:
    """What one fake GPU reports, in NVML's own units (bytes, mW, mJ, MHz, KiB)."""

    name: str = "NVIDIA H100 80GB HBM3"
    uuid: str = "GPU-00000000-0000-4000-8000-000000000000"
    memory_total_bytes: int = 80 * GIB
    memory_used_bytes: int = 10 * GIB
    util_gpu: int = 50
    util_memory: int = 20
    power_usage_mw: int = 300_000
    power_instant_mw: int = 310_000
    power_limit_mw: int = 700_000
    energy_mj: int = 1_000_000
    sm_clock_mhz: int = 1980
    mem_clock_mhz: int = 2619
    temperature_c: int = 60
    clocks_event_reasons: int = 0
    pcie_tx_bytes: int = 0
    pcie_rx_bytes: int = 0
    nvlink_tx_kib: int = 0
    nvlink_rx_kib: int = 0
    gpm_supported: bool = True
    gpm_metrics: dict[int, float] = field(default_factory=dict)  # metric id -> value
    mig_capable: bool = True
    mig: list[FakeMig] = field(default_factory=list)  # non-empty: MIG mode is enabled
    processes: list[tuple[int, int | None]] = field(default_factory=list)  # (pid, bytes)


@dataclass(frozen=True)
class FakeHandle:
    """A device handle: a whole GPU, or one MIG slot on it."""

    gpu: int
    mig_slot: int | None = None


@dataclass
class FakeGpmSample:
    """Stands in for pynvml's opaque ``c_nvmlGpmSample_t``."""

    gpu: int | None = None
    taken: int | None = None  # order in which samples were taken
    freed: bool = False


@dataclass
class FakeGpmMetric:
    """Same attribute names as ``pynvml.c_nvmlGpmMetric_t``."""

    metricId: int = 0  # noqa: N815 - pynvml's names
    nvmlReturn: int = 0  # noqa: N815
    value: float = 0.0
    metricInfo: Any = None  # noqa: N815


class FakeGpmMetricsGet:
    """Same attribute names as ``pynvml.c_nvmlGpmMetricsGet_t``."""

    def __init__(self) -> None:
        self.version = 0
        self.numMetrics = 0
        self.sample1: Any = None
        self.sample2: Any = None
        self.metrics = [FakeGpmMetric() for _ in range(real.NVML_GPM_METRIC_MAX)]


@dataclass
class Hang:
    """A call that blocks until the test sets ``release`` (or HANG_LIMIT_S passes)."""

    entered: threading.Event = field(default_factory=threading.Event)
    release: threading.Event = field(default_factory=threading.Event)
    returned: threading.Event = field(default_factory=threading.Event)


class FakeNvml:
    """Module-like fake of pynvml; pass an instance wherever the ``pynvml`` module goes."""

    c_nvmlGpmMetricsGet_t = FakeGpmMetricsGet  # noqa: N815 - pynvml's name

    def __init__(
        self,
        gpus: list[FakeGpu],
        *,
        driver_version: str = "550.54.15",
        nvml_version: str = "12.550.54.15",
    ) -> None:
        self.gpus = gpus
        self.driver_version = driver_version
        self.nvml_version = nvml_version
        self.init_error: int | None = None
        self.initialized = False
        self.timestamp_us = 1_000_000  # the read time field values report
        self.value_types: dict[int, int] = {}  # field id -> valueType override
        self.calls: Counter[str] = Counter()
        self.device_calls: Counter[tuple[str, int]] = Counter()  # (call, GPU index)
        self.samples: list[FakeGpmSample] = []
        self._failures: dict[tuple[str, int | None], int] = {}
        self._field_failures: dict[tuple[int, int], int] = {}
        self._metric_failures: dict[tuple[int, int], int] = {}
        self._hangs: dict[tuple[str, int | None], Hang] = {}
        self._lost: set[int] = set()
        self._lock = threading.Lock()  # the collector calls from several threads

    def __getattr__(self, name: str) -> Any:
        # NVML_* constants and NVMLError* classes are the real module's.
        if name.startswith("NVML"):
            return getattr(real, name)
        raise AttributeError(name)

    # Knobs -------------------------------------------------------------------------------

    def fail(self, fn_name: str, code: int, gpu: int | None = None) -> None:
        """Every later call of ``fn_name`` (on ``gpu``, or on any GPU) raises ``code``."""
        self._failures[(fn_name, gpu)] = code

    def heal(self) -> None:
        """Remove every injected call, field and metric failure."""
        self._failures.clear()
        self._field_failures.clear()
        self._metric_failures.clear()

    def fail_field(self, gpu: int, field_id: int, code: int) -> None:
        """That field value comes back with ``nvmlReturn = code``."""
        self._field_failures[(gpu, field_id)] = code

    def fail_gpm_metric(self, gpu: int, metric_id: int, code: int) -> None:
        """That GPM metric comes back with ``nvmlReturn = code``."""
        self._metric_failures[(gpu, metric_id)] = code

    def hang(self, fn_name: str, gpu: int | None = None) -> Hang:
        """The next call of ``fn_name`` on ``gpu`` blocks until released."""
        hang = Hang()
        self._hangs[(fn_name, gpu)] = hang
        return hang

    def lose(self, gpu: int) -> None:
        """From now on every call on ``gpu`` raises GPU-is-lost."""
        self._lost.add(gpu)

    def calls_on(self, gpu: int) -> int:
        """How many calls were made on one GPU (or its MIG instances)."""
        return sum(n for (_, index), n in self.device_calls.items() if index == gpu)

    # Plumbing ----------------------------------------------------------------------------

    def _enter(self, fn_name: str, gpu: int | None = None) -> None:
        with self._lock:
            self.calls[fn_name] += 1
            if gpu is not None:
                self.device_calls[(fn_name, gpu)] += 1
            code = self._failures.get((fn_name, gpu), self._failures.get((fn_name, None)))
            if not self.initialized and fn_name != "nvmlInit":
                code = real.NVML_ERROR_UNINITIALIZED
            elif gpu in self._lost:
                code = real.NVML_ERROR_GPU_IS_LOST
            hang = self._hangs.pop((fn_name, gpu), None)
        if hang is not None:
            hang.entered.set()
            hang.release.wait(HANG_LIMIT_S)
            hang.returned.set()
        if code is not None:
            raise real.NVMLError(code)

    def _device(self, fn_name: str, handle: FakeHandle) -> FakeGpu:
        self._enter(fn_name, handle.gpu)
        return self.gpus[handle.gpu]

    def _mig(self, fn_name: str, handle: FakeHandle) -> FakeMig:
        gpu = self._device(fn_name, handle)
        if handle.mig_slot is None:
            raise real.NVMLError(real.NVML_ERROR_INVALID_ARGUMENT)
        return gpu.mig[handle.mig_slot]

    # System ------------------------------------------------------------------------------

    def nvmlInit(self) -> None:
        self._enter("nvmlInit")
        if self.init_error is not None:
            raise real.NVMLError(self.init_error)
        self.initialized = True

    def nvmlShutdown(self) -> None:
        self._enter("nvmlShutdown")
        self.initialized = False

    def nvmlSystemGetDriverVersion(self) -> str:
        self._enter("nvmlSystemGetDriverVersion")
        return self.driver_version

    def nvmlSystemGetNVMLVersion(self) -> str:
        self._enter("nvmlSystemGetNVMLVersion")
        return self.nvml_version

    def nvmlDeviceGetCount(self) -> int:
        self._enter("nvmlDeviceGetCount")
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> FakeHandle:
        self._enter("nvmlDeviceGetHandleByIndex", index)
        if not 0 <= index < len(self.gpus):
            raise real.NVMLError(real.NVML_ERROR_INVALID_ARGUMENT)
        return FakeHandle(index)

    # Device: static ----------------------------------------------------------------------

    def nvmlDeviceGetUUID(self, handle: FakeHandle) -> str:
        if handle.mig_slot is not None:
            return self._mig("nvmlDeviceGetUUID", handle).uuid
        return self._device("nvmlDeviceGetUUID", handle).uuid

    def nvmlDeviceGetName(self, handle: FakeHandle) -> str:
        gpu = self._device("nvmlDeviceGetName", handle)
        if handle.mig_slot is not None:
            return f"{gpu.name} MIG {gpu.mig[handle.mig_slot].profile}"
        return gpu.name

    def nvmlDeviceGetEnforcedPowerLimit(self, handle: FakeHandle) -> int:
        return self._device("nvmlDeviceGetEnforcedPowerLimit", handle).power_limit_mw

    # Device: per tick --------------------------------------------------------------------

    def nvmlDeviceGetMemoryInfo(self, handle: FakeHandle, version: int | None = None) -> Any:
        gpu = self._device("nvmlDeviceGetMemoryInfo", handle)
        used, total = gpu.memory_used_bytes, gpu.memory_total_bytes
        return real.c_nvmlMemory_t(total=total, free=total - used, used=used)

    def nvmlDeviceGetUtilizationRates(self, handle: FakeHandle) -> Any:
        gpu = self._device("nvmlDeviceGetUtilizationRates", handle)
        return real.c_nvmlUtilization_t(gpu=gpu.util_gpu, memory=gpu.util_memory)

    def nvmlDeviceGetPowerUsage(self, handle: FakeHandle) -> int:
        return self._device("nvmlDeviceGetPowerUsage", handle).power_usage_mw

    def nvmlDeviceGetClockInfo(self, handle: FakeHandle, clock_type: int) -> int:
        gpu = self._device("nvmlDeviceGetClockInfo", handle)
        clocks = {real.NVML_CLOCK_SM: gpu.sm_clock_mhz, real.NVML_CLOCK_MEM: gpu.mem_clock_mhz}
        if clock_type not in clocks:
            raise real.NVMLError(real.NVML_ERROR_INVALID_ARGUMENT)
        return clocks[clock_type]

    def nvmlDeviceGetCurrentClocksEventReasons(self, handle: FakeHandle) -> int:
        return self._device("nvmlDeviceGetCurrentClocksEventReasons", handle).clocks_event_reasons

    def nvmlDeviceGetCurrentClocksThrottleReasons(self, handle: FakeHandle) -> int:
        gpu = self._device("nvmlDeviceGetCurrentClocksThrottleReasons", handle)
        return gpu.clocks_event_reasons

    def nvmlDeviceGetTemperatureV(self, handle: FakeHandle, sensor: int) -> int:
        return self._temperature("nvmlDeviceGetTemperatureV", handle, sensor)

    def nvmlDeviceGetTemperature(self, handle: FakeHandle, sensor: int) -> int:
        return self._temperature("nvmlDeviceGetTemperature", handle, sensor)

    def _temperature(self, fn_name: str, handle: FakeHandle, sensor: int) -> int:
        gpu = self._device(fn_name, handle)
        if sensor != real.NVML_TEMPERATURE_GPU:
            raise real.NVMLError(real.NVML_ERROR_INVALID_ARGUMENT)
        return gpu.temperature_c

    def nvmlDeviceGetFieldValues(self, handle: FakeHandle, field_ids: list[Any]) -> Any:
        gpu = self._device("nvmlDeviceGetFieldValues", handle)
        values = (real.c_nvmlFieldValue_t * len(field_ids))()
        for slot, requested in enumerate(field_ids):
            field_id, scope_id = requested if isinstance(requested, tuple) else (requested, 0)
            self._fill_field(handle.gpu, gpu, values[slot], field_id, scope_id)
        return values

    def _fill_field(self, index: int, gpu: FakeGpu, out: Any, field_id: int, scope: int) -> None:
        out.fieldId, out.scopeId, out.timestamp = field_id, scope, self.timestamp_us
        raw = self._field_raw(gpu, field_id, scope)
        failure = self._field_failures.get((index, field_id))
        if failure is not None or raw is None:
            out.nvmlReturn = real.NVML_ERROR_NOT_SUPPORTED if failure is None else failure
            return
        value_type = self.value_types.get(field_id, real.NVML_VALUE_TYPE_UNSIGNED_LONG_LONG)
        out.valueType, out.nvmlReturn = value_type, real.NVML_SUCCESS
        modulus = _VALUE_MODULUS.get(value_type)
        setattr(out.value, _VALUE_MEMBER[value_type], raw if modulus is None else raw % modulus)

    @staticmethod
    def _field_raw(gpu: FakeGpu, field_id: int, scope: int) -> int | None:
        if (
            field_id
            in (
                real.NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_TX,
                real.NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_RX,
            )
            and scope != 0xFFFFFFFF
        ):
            return None  # this fake only knows the all-links total
        return {
            real.NVML_FI_DEV_POWER_INSTANT: gpu.power_instant_mw,
            real.NVML_FI_DEV_TOTAL_ENERGY_CONSUMPTION: gpu.energy_mj,
            real.NVML_FI_DEV_PCIE_COUNT_TX_BYTES: gpu.pcie_tx_bytes,
            real.NVML_FI_DEV_PCIE_COUNT_RX_BYTES: gpu.pcie_rx_bytes,
            real.NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_TX: gpu.nvlink_tx_kib,
            real.NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_RX: gpu.nvlink_rx_kib,
        }.get(field_id)

    def nvmlDeviceGetComputeRunningProcesses(self, handle: FakeHandle) -> list[Any]:
        gpu = self._device("nvmlDeviceGetComputeRunningProcesses", handle)
        return [
            real.nvmlFriendlyObject(
                {
                    "pid": pid,
                    "usedGpuMemory": used,
                    "gpuInstanceId": 0xFFFFFFFF,
                    "computeInstanceId": 0xFFFFFFFF,
                }
            )
            for pid, used in gpu.processes
        ]

    # GPM ---------------------------------------------------------------------------------

    def nvmlGpmQueryDeviceSupport(self, handle: FakeHandle) -> Any:
        gpu = self._device("nvmlGpmQueryDeviceSupport", handle)
        support = real.c_nvmlGpmSupport_t()
        support.version = real.NVML_GPM_SUPPORT_VERSION
        support.isSupportedDevice = int(gpu.gpm_supported)
        return support

    def nvmlGpmSampleAlloc(self) -> FakeGpmSample:
        self._enter("nvmlGpmSampleAlloc")
        sample = FakeGpmSample()
        self.samples.append(sample)
        return sample

    def nvmlGpmSampleFree(self, sample: FakeGpmSample) -> None:
        self._enter("nvmlGpmSampleFree")
        if sample.freed:
            raise real.NVMLError(real.NVML_ERROR_INVALID_ARGUMENT)
        sample.freed = True

    def nvmlGpmSampleGet(self, handle: FakeHandle, sample: FakeGpmSample) -> FakeGpmSample:
        gpu = self._device("nvmlGpmSampleGet", handle)
        if not gpu.gpm_supported:
            raise real.NVMLError(real.NVML_ERROR_NOT_SUPPORTED)
        if sample.freed:
            raise real.NVMLError(real.NVML_ERROR_INVALID_ARGUMENT)
        with self._lock:
            sample.gpu, sample.taken = handle.gpu, self.calls["nvmlGpmSampleGet"]
        return sample

    def nvmlGpmMetricsGet(self, request: FakeGpmMetricsGet) -> FakeGpmMetricsGet:
        first, second = request.sample1, request.sample2
        self._enter("nvmlGpmMetricsGet", first.gpu)
        if not self._valid_pair(request):
            raise real.NVMLError(real.NVML_ERROR_INVALID_ARGUMENT)
        gpu = self.gpus[second.gpu]
        for metric in request.metrics[: request.numMetrics]:
            code = self._metric_failures.get((second.gpu, metric.metricId))
            if code is None and metric.metricId not in gpu.gpm_metrics:
                code = real.NVML_ERROR_NOT_SUPPORTED
            metric.nvmlReturn = real.NVML_SUCCESS if code is None else code
            metric.value = gpu.gpm_metrics.get(metric.metricId, 0.0)
        return request

    @staticmethod
    def _valid_pair(request: FakeGpmMetricsGet) -> bool:
        first, second = request.sample1, request.sample2
        return (
            request.version == real.NVML_GPM_METRICS_GET_VERSION
            and isinstance(first, FakeGpmSample)
            and isinstance(second, FakeGpmSample)
            and not (first.freed or second.freed)
            and first.gpu is not None
            and first.gpu == second.gpu
            and first.taken is not None
            and second.taken is not None
            and second.taken > first.taken
        )

    # MIG ---------------------------------------------------------------------------------

    def nvmlDeviceGetMigMode(self, handle: FakeHandle) -> list[int]:
        gpu = self._device("nvmlDeviceGetMigMode", handle)
        if not gpu.mig_capable:
            raise real.NVMLError(real.NVML_ERROR_NOT_SUPPORTED)
        mode = real.NVML_DEVICE_MIG_ENABLE if gpu.mig else real.NVML_DEVICE_MIG_DISABLE
        return [mode, mode]

    def nvmlDeviceGetMaxMigDeviceCount(self, handle: FakeHandle) -> int:
        self._device("nvmlDeviceGetMaxMigDeviceCount", handle)
        return 7

    def nvmlDeviceGetMigDeviceHandleByIndex(self, handle: FakeHandle, slot: int) -> FakeHandle:
        gpu = self._device("nvmlDeviceGetMigDeviceHandleByIndex", handle)
        if slot >= len(gpu.mig):
            raise real.NVMLError(real.NVML_ERROR_NOT_FOUND)
        return FakeHandle(handle.gpu, slot)

    def nvmlDeviceGetGpuInstanceId(self, handle: FakeHandle) -> int:
        return self._mig("nvmlDeviceGetGpuInstanceId", handle).gpu_instance_id

    def nvmlDeviceGetComputeInstanceId(self, handle: FakeHandle) -> int:
        return self._mig("nvmlDeviceGetComputeInstanceId", handle).compute_instance_id
