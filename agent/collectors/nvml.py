"""Live NVML collector: per-GPU counters, GPM metrics and processes behind per-call timeouts.

Every NVML call goes through :class:`_GuardedNvml`. Calls for one GPU run on that GPU's own
daemon worker thread, one job per GPU per tick (one thread hand-off per GPU, not per call,
to keep the agent's CPU cost low), and the caller waits at most ``call_timeout_s`` for any
single call inside the job. An NVML error or a timeout removes only the fields that call
feeds; it is counted in :class:`CollectorHealth` and logged once per (field, reason). While a
timed-out call is still stuck in the driver its GPU is skipped, so later ticks never wedge.

Not supported here: per-MIG-instance GPM (``nvmlGpmMigSampleGet``), because a ``GpuSample``
has no MIG-instance identity to carry it; device-level GPM is read on MIG-enabled GPUs too.
The collector is meant to be driven from one thread.
"""

from __future__ import annotations

import logging
import queue
import re
import socket
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Final, TypeVar

from agent.samples import (
    CollectorHealth,
    GpuDescription,
    GpuProcess,
    GpuSample,
    HostDescription,
    MigDescription,
    Tick,
)
from proto.errors import GpuattestError

log = logging.getLogger(__name__)

T = TypeVar("T")

#: ``pynvml`` (nvidia-ml-py) is untyped; tests pass a stand-in with the same names.
NvmlModule = Any

DEFAULT_CALL_TIMEOUT_S: Final = 1.0
#: NVML needs two GPM samples at least this far apart to compute metrics.
GPM_MIN_INTERVAL_S: Final = 0.1

_MIB: Final = 1 << 20
#: nvml.h: scopeId UINT_MAX on an NVLink throughput field sums the counter over every link.
_NVLINK_ALL_LINKS: Final = 0xFFFFFFFF
#: pynvml maps NVML_VALUE_NOT_AVAILABLE to None, but older versions pass the raw sentinel.
_NOT_AVAILABLE_U64: Final = (1 << 64) - 1

#: nvmlFieldValue_t.valueType -> the c_nvmlValue_t member holding the number.
_VALUE_MEMBER_BY_TYPE_NAME: Final = {
    "NVML_VALUE_TYPE_DOUBLE": "dVal",
    "NVML_VALUE_TYPE_UNSIGNED_INT": "uiVal",
    "NVML_VALUE_TYPE_UNSIGNED_LONG": "ulVal",
    "NVML_VALUE_TYPE_UNSIGNED_LONG_LONG": "ullVal",
    "NVML_VALUE_TYPE_SIGNED_LONG_LONG": "sllVal",
    "NVML_VALUE_TYPE_SIGNED_INT": "siVal",
    "NVML_VALUE_TYPE_UNSIGNED_SHORT": "usVal",
}
#: Width of an unsigned counter, so a wrapped byte counter still gives the right delta.
_COUNTER_MODULUS: Final = {"uiVal": 1 << 32, "ulVal": 1 << 64, "ullVal": 1 << 64, "usVal": 1 << 16}


class NvmlError(GpuattestError):
    """The NVML collector cannot do what was asked."""


class NvmlInitError(NvmlError):
    """NVML is installed but would not start, for a reason other than 'no driver here'."""


@dataclass(frozen=True)
class _FieldSpec:
    """One ``nvmlDeviceGetFieldValues`` entry and how it becomes a canonical sample field."""

    sample_field: str
    field_id_name: str  # the pynvml constant; resolved against the module at open
    scale: float = 1.0  # raw unit -> canonical unit
    all_links: bool = False
    byte_counter: bool = False  # cumulative bytes, turned into a rate between two reads


_FIELD_SPECS: Final = (
    _FieldSpec("power_w", "NVML_FI_DEV_POWER_INSTANT", scale=1e-3),  # mW
    _FieldSpec("energy_mj", "NVML_FI_DEV_TOTAL_ENERGY_CONSUMPTION"),
    _FieldSpec("pcie_tx_kib_s", "NVML_FI_DEV_PCIE_COUNT_TX_BYTES", 1 / 1024, byte_counter=True),
    _FieldSpec("pcie_rx_kib_s", "NVML_FI_DEV_PCIE_COUNT_RX_BYTES", 1 / 1024, byte_counter=True),
    _FieldSpec("nvlink_tx_kib", "NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_TX", all_links=True),
    _FieldSpec("nvlink_rx_kib", "NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_RX", all_links=True),
)


@dataclass(frozen=True)
class _ScalarRead:
    """A call that returns one number for a GPU; later names are older spellings of the call."""

    sample_field: str
    calls: tuple[str, ...]
    arg_name: str | None = None  # pynvml constant passed after the handle
    scale: float = 1.0


_SCALAR_READS: Final = (
    _ScalarRead("power_avg_w", ("nvmlDeviceGetPowerUsage",), scale=1e-3),  # mW
    _ScalarRead("sm_clock_mhz", ("nvmlDeviceGetClockInfo",), "NVML_CLOCK_SM"),
    _ScalarRead("mem_clock_mhz", ("nvmlDeviceGetClockInfo",), "NVML_CLOCK_MEM"),
    _ScalarRead(
        "throttle_reasons",
        ("nvmlDeviceGetCurrentClocksEventReasons", "nvmlDeviceGetCurrentClocksThrottleReasons"),
    ),
    _ScalarRead(
        "temperature_c",
        ("nvmlDeviceGetTemperatureV", "nvmlDeviceGetTemperature"),
        "NVML_TEMPERATURE_GPU",
    ),
)

_GPM_METRICS: Final = (
    ("sm_active_pct", "NVML_GPM_METRIC_SM_UTIL"),
    ("sm_occupancy_pct", "NVML_GPM_METRIC_SM_OCCUPANCY"),
    ("tensor_active_pct", "NVML_GPM_METRIC_ANY_TENSOR_UTIL"),
    ("dram_bw_pct", "NVML_GPM_METRIC_DRAM_BW_UTIL"),
)
_GPM_FIELDS: Final = tuple(name for name, _ in _GPM_METRICS)

_MIG_PROFILE: Final = re.compile(r"\bMIG\s+(\S+)\s*$")


class _CallTimeoutError(Exception):
    """Internal: one NVML call on a worker ran past the per-call timeout."""

    def __init__(self, fields: tuple[str, ...]) -> None:
        super().__init__(", ".join(fields))
        self.fields = fields


class _Worker:
    """A daemon thread running jobs in order, tracking which NVML call is in flight.

    A plain daemon thread rather than a ThreadPoolExecutor: executor threads are joined at
    interpreter exit, so a call stuck in the driver would stop the agent from exiting.
    """

    def __init__(self, name: str) -> None:
        self._jobs: queue.SimpleQueue[tuple[Future[Any], Callable[[], Any]] | None] = (
            queue.SimpleQueue()
        )
        self._latest: Future[Any] | None = None
        self._call_started = 0.0
        self.call_fields: tuple[str, ...] = ()
        threading.Thread(target=self._serve, name=name, daemon=True).start()

    def _serve(self) -> None:
        while (job := self._jobs.get()) is not None:
            future, fn = job
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn())
            except Exception as exc:  # handed to the waiting caller, who re-raises it
                future.set_exception(exc)

    @property
    def wedged(self) -> bool:
        """True while the last job submitted has not finished (a call is stuck)."""
        latest = self._latest
        return latest is not None and not latest.done()

    def mark_call(self, fields: tuple[str, ...]) -> None:
        """Worker side: a new NVML call starts now; its timeout is counted from here."""
        self.call_fields = fields
        self._call_started = time.monotonic()

    def submit(self, job: Callable[[], T]) -> Future[T]:
        """Queue ``job``; the first call's timeout counts from now."""
        future: Future[T] = Future()
        self.call_fields = ()
        self._call_started = time.monotonic()
        self._latest = future
        self._jobs.put((future, job))
        return future

    def wait(self, future: Future[T], timeout_s: float) -> T:
        """The job's result; raises _CallTimeoutError once a single call runs past ``timeout_s``."""
        while True:
            started = self._call_started
            remaining = started + timeout_s - time.monotonic()
            wait_futures([future], timeout=max(remaining, 0.0))
            if future.done():
                return future.result()
            if self._call_started == started:  # the same call is still running
                raise _CallTimeoutError(self.call_fields)

    def stop(self) -> None:
        """Let the thread end once its current job (if any) returns."""
        self._jobs.put(None)


class _Lane:
    """One worker thread plus what NVML has told us about the calls made through it."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.worker = _Worker(f"nvml-{name}")
        self.lost = False
        # (call, fields) pairs NVML said it will never serve: not asked again.
        self.unsupported: set[tuple[str, tuple[str, ...]]] = set()


class _DegradedReads:
    """Counts failed reads in a CollectorHealth and logs each (field, reason) once."""

    def __init__(self, health: CollectorHealth) -> None:
        self.health = health
        self._lock = threading.Lock()  # worker threads record concurrently
        self._logged: set[tuple[str, str]] = set()

    def record(self, fields: Iterable[str], reason: str) -> None:
        """Count one failed read of each field; log the first (field, reason) pair only."""
        with self._lock:
            for name in fields:
                self.health.record(name)
                if (name, reason) not in self._logged:
                    self._logged.add((name, reason))
                    log.warning("NVML read of %s degraded: %s (logged once)", name, reason)


class _GuardedNvml:
    """The one way this module calls NVML: failures and timeouts become absent fields."""

    def __init__(self, nvml: NvmlModule, timeout_s: float, degraded: _DegradedReads) -> None:
        self.nvml = nvml
        self.timeout_s = timeout_s
        self.degraded = degraded
        mismatch = getattr(nvml, "NVMLLibraryMismatchError", nvml.NVMLError)
        self._caught: tuple[type[Exception], ...] = (nvml.NVMLError, mismatch)
        # Errors that will not go away: the call is not made again on that lane.
        self._permanent: tuple[type[Exception], ...] = (
            nvml.NVMLError_NotSupported,
            nvml.NVMLError_FunctionNotFound,
            mismatch,
        )
        self._lost: tuple[type[Exception], ...] = (
            nvml.NVMLError_GpuIsLost,
            nvml.NVMLError_ResetRequired,
        )

    # Caller side -------------------------------------------------------------------------

    def submit(self, lane: _Lane, job: Callable[[], T]) -> Future[T] | None:
        """Start ``job`` on the lane's worker; None (counted) while an earlier call is stuck."""
        if lane.worker.wedged:
            self.degraded.record(lane.worker.call_fields, "skipped: earlier call still hung")
            return None
        return lane.worker.submit(job)

    def wait(self, lane: _Lane, future: Future[T]) -> T | None:
        """The job's result, or None (counted) when one of its calls timed out."""
        try:
            return lane.worker.wait(future, self.timeout_s)
        except _CallTimeoutError as hung:
            self.degraded.record(hung.fields, f"timeout after {self.timeout_s:g} s")
            return None

    def run(self, lane: _Lane, job: Callable[[], T]) -> T | None:
        """Submit and wait for one job."""
        future = self.submit(lane, job)
        return None if future is None else self.wait(lane, future)

    # Worker side -------------------------------------------------------------------------

    def call(
        self,
        lane: _Lane,
        fields: tuple[str, ...],
        fn_name: str,
        *args: Any,
        quiet: tuple[type[Exception], ...] = (),
        even_if_lost: bool = False,
    ) -> Any:
        """``nvml.<fn_name>(*args)``, or None when it failed; ``fields`` name what it feeds.

        Errors in ``quiet`` are expected answers (e.g. "no MIG here") and are not counted.
        """
        key = (fn_name, fields)
        if (lane.lost and not even_if_lost) or key in lane.unsupported:
            return None
        fn = getattr(self.nvml, fn_name, None)
        if fn is None:
            lane.unsupported.add(key)
            self.degraded.record(fields, f"{fn_name} missing from pynvml")
            return None
        lane.worker.mark_call(fields)
        try:
            return fn(*args)
        except self._caught as exc:
            if not isinstance(exc, quiet):
                self.degrade(lane, fields, key, exc)
            return None

    def degrade(
        self, lane: _Lane, fields: tuple[str, ...], key: tuple[str, tuple[str, ...]], exc: Exception
    ) -> None:
        """Apply an NVML error to the lane (lost, never supported) and count it."""
        if isinstance(exc, self._lost) and not lane.lost:
            lane.lost = True
            log.warning(
                "%s is lost (%s); reported absent from now on", lane.name, type(exc).__name__
            )
        elif isinstance(exc, self._permanent):
            lane.unsupported.add(key)
        # The class name, never str(exc): NVMLError.__str__ may call back into the library.
        self.degraded.record(fields, type(exc).__name__)

    def error_for(self, code: int) -> Exception:
        """The pynvml exception for a per-field / per-metric nvmlReturn code."""
        error: Exception = self.nvml.NVMLError(code)
        return error


@dataclass
class _GpmState:
    """Two GPM sample buffers for one GPU: the previous sample and the one to fill next."""

    previous: Any
    spare: Any
    previous_at: float | None = None


@dataclass(eq=False)
class _Gpu:
    index: int
    lane: _Lane
    handle: Any = None
    gpm: _GpmState | None = None
    byte_counters: dict[str, tuple[float, float]] = field(default_factory=dict)


class _SampleBuffer:
    """Values one GPU read has produced so far; sealed early if one of its calls hangs."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values: dict[str, float] = {}
        self._sealed = False

    def put(self, name: str, value: float) -> None:
        """Worker side: keep a value unless the caller already gave up on this read."""
        with self._lock:
            if not self._sealed:
                self._values[name] = float(value)

    def seal(self) -> dict[str, float]:
        """Caller side: the values read so far; later puts are dropped."""
        with self._lock:
            self._sealed = True
            return dict(self._values)


def _text(value: object) -> str:
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    return "" if value is None else str(value)


def _used_memory_mib(used_bytes: object) -> int:
    if not isinstance(used_bytes, int) or used_bytes == _NOT_AVAILABLE_U64:
        return 0  # Windows WDDM / some MIG setups: NVML cannot say
    return used_bytes // _MIB


class NvmlCollector:
    """Reads NVML on a live GPU host. Create with :func:`open_nvml`."""

    source: str = "nvml"

    def __init__(
        self,
        guard: _GuardedNvml,
        host: _Lane,
        gpus: list[_Gpu],
        clock: Callable[[], float],
        hostname: str,
    ) -> None:
        self._guard = guard
        self._nvml = guard.nvml
        self._host = host
        self._gpus = gpus
        self._clock = clock
        self._hostname = hostname
        self._closed = False
        self._description = HostDescription(hostname=hostname)
        self._fields = self._resolve_fields()
        self._value_members = {
            getattr(self._nvml, name): member
            for name, member in _VALUE_MEMBER_BY_TYPE_NAME.items()
            if hasattr(self._nvml, name)
        }

    @property
    def health(self) -> CollectorHealth:
        """Counts of degraded reads by field since open."""
        return self._guard.degraded.health

    def describe_host(self) -> HostDescription:
        """Static host and GPU facts, read once at open."""
        return self._description

    def read_tick(self) -> Tick:
        """Read every live GPU now; a GPU with nothing readable is absent from the tick."""
        self._require_open()
        now = self._clock()
        pending: list[tuple[_Gpu, _SampleBuffer, Future[None]]] = []
        for gpu in self._live_gpus():
            buffer = _SampleBuffer()
            future = self._guard.submit(gpu.lane, partial(self._read_gpu, gpu, now, buffer))
            if future is not None:
                pending.append((gpu, buffer, future))
        samples: list[GpuSample] = []
        for gpu, buffer, future in pending:
            self._guard.wait(gpu.lane, future)
            values = buffer.seal()
            if values:
                samples.append(GpuSample(gpu_index=gpu.index, values=values))
        return Tick(t_unix_s=now, samples=tuple(samples))

    def processes(self) -> list[GpuProcess]:
        """Processes with a compute context on any live GPU (costs ms: call every few s)."""
        self._require_open()
        pending = [
            (gpu, future)
            for gpu in self._live_gpus()
            if (future := self._guard.submit(gpu.lane, partial(self._read_processes, gpu)))
            is not None
        ]
        found: list[GpuProcess] = []
        for gpu, future in pending:
            on_gpu = self._guard.wait(gpu.lane, future)
            found.extend(on_gpu or ())
        return found

    def close(self) -> None:
        """Free GPM samples and shut NVML down once; later calls do nothing."""
        if self._closed:
            return
        self._closed = True
        for gpu in self._gpus:
            if gpu.gpm is not None:  # never freed while a stuck call may still use them
                self._guard.run(gpu.lane, partial(self._free_gpm, gpu))
        self._guard.run(
            self._host, partial(self._guard.call, self._host, ("shutdown",), "nvmlShutdown")
        )
        for lane in [self._host, *(gpu.lane for gpu in self._gpus)]:
            lane.worker.stop()

    # Open --------------------------------------------------------------------------------

    def _load_static_facts(self) -> None:
        """Read host and per-GPU facts once (and allocate GPM buffers) at open."""
        call = partial(self._guard.call, self._host)
        versions = self._guard.run(
            self._host,
            lambda: (
                call(("driver_version",), "nvmlSystemGetDriverVersion"),
                call(("nvml_version",), "nvmlSystemGetNVMLVersion"),
            ),
        )
        driver, nvml_version = versions if versions is not None else (None, None)
        pending = [
            (gpu, self._guard.submit(gpu.lane, partial(self._describe_gpu, gpu)))
            for gpu in self._gpus
            if gpu.handle is not None
        ]
        described = {
            gpu.index: self._guard.wait(gpu.lane, future)
            for gpu, future in pending
            if future is not None
        }
        self._description = HostDescription(
            hostname=self._hostname,
            driver_version=_text(driver),
            nvml_version=_text(nvml_version),
            gpus=tuple(described.get(gpu.index) or GpuDescription(gpu.index) for gpu in self._gpus),
        )

    def _resolve_fields(self) -> tuple[tuple[_FieldSpec, Any], ...]:
        """Field specs whose constant this pynvml knows, with the request entry for each."""
        resolved: list[tuple[_FieldSpec, Any]] = []
        for spec in _FIELD_SPECS:
            field_id = getattr(self._nvml, spec.field_id_name, None)
            if field_id is None:
                log.info(
                    "pynvml has no %s; %s not collected", spec.field_id_name, spec.sample_field
                )
                continue
            resolved.append((spec, (field_id, _NVLINK_ALL_LINKS) if spec.all_links else field_id))
        return tuple(resolved)

    def _describe_gpu(self, gpu: _Gpu) -> GpuDescription:
        call = partial(self._guard.call, gpu.lane)
        memory = call(("memory_total_mib",), "nvmlDeviceGetMemoryInfo", gpu.handle)
        limit_mw = call(("power_limit_w",), "nvmlDeviceGetEnforcedPowerLimit", gpu.handle)
        return GpuDescription(
            index=gpu.index,
            uuid=_text(call(("uuid",), "nvmlDeviceGetUUID", gpu.handle)),
            name=_text(call(("name",), "nvmlDeviceGetName", gpu.handle)),
            memory_total_mib=0 if memory is None else int(memory.total) // _MIB,
            power_limit_w=0.0 if limit_mw is None else limit_mw / 1000,
            gpm_supported=self._start_gpm(gpu),
            mig_instances=self._mig_instances(gpu),
        )

    def _start_gpm(self, gpu: _Gpu) -> bool:
        """Whether the GPU supports GPM; if so, allocate its two sample buffers."""
        support = self._guard.call(
            gpu.lane,
            ("gpm_supported",),
            "nvmlGpmQueryDeviceSupport",
            gpu.handle,
            quiet=(self._nvml.NVMLError_NotSupported, self._nvml.NVMLError_FunctionNotFound),
        )
        if support is None or not support.isSupportedDevice:
            return False
        buffers = [self._guard.call(gpu.lane, _GPM_FIELDS, "nvmlGpmSampleAlloc") for _ in range(2)]
        if None in buffers:
            for buffer in buffers:
                if buffer is not None:
                    self._guard.call(gpu.lane, ("gpm_free",), "nvmlGpmSampleFree", buffer)
        else:
            gpu.gpm = _GpmState(previous=buffers[0], spare=buffers[1])
        return True

    def _mig_instances(self, gpu: _Gpu) -> tuple[MigDescription, ...]:
        call = partial(self._guard.call, gpu.lane)
        mode = call(
            ("mig",), "nvmlDeviceGetMigMode", gpu.handle, quiet=(self._nvml.NVMLError_NotSupported,)
        )
        if not mode or mode[0] != self._nvml.NVML_DEVICE_MIG_ENABLE:
            return ()
        instances: list[MigDescription] = []
        for slot in range(call(("mig",), "nvmlDeviceGetMaxMigDeviceCount", gpu.handle) or 0):
            mig = call(
                ("mig",),
                "nvmlDeviceGetMigDeviceHandleByIndex",
                gpu.handle,
                slot,
                quiet=(self._nvml.NVMLError_NotFound,),  # an empty slot
            )
            described = None if mig is None else self._describe_mig(gpu, mig)
            if described is not None:
                instances.append(described)
        return tuple(instances)

    def _describe_mig(self, gpu: _Gpu, mig: Any) -> MigDescription | None:
        call = partial(self._guard.call, gpu.lane, ("mig",))
        gpu_instance = call("nvmlDeviceGetGpuInstanceId", mig)
        compute_instance = call("nvmlDeviceGetComputeInstanceId", mig)
        if gpu_instance is None or compute_instance is None:
            return None  # an instance nobody can attribute work to; counted under "mig"
        # The MIG device name ends in its profile ("... MIG 1g.10gb"): one cheap call.
        match = _MIG_PROFILE.search(_text(call("nvmlDeviceGetName", mig)))
        return MigDescription(
            gpu_instance_id=int(gpu_instance),
            compute_instance_id=int(compute_instance),
            uuid=_text(call("nvmlDeviceGetUUID", mig)),
            profile=match.group(1) if match else "",
        )

    # Tick (runs on the GPU's worker) -------------------------------------------------------

    def _read_gpu(self, gpu: _Gpu, now: float, out: _SampleBuffer) -> None:
        self._read_field_values(gpu, now, out)
        self._read_utilization(gpu, out)
        self._read_memory(gpu, out)
        for read in _SCALAR_READS:
            self._read_scalar(gpu, read, out)
        self._read_gpm(gpu, now, out)

    def _read_field_values(self, gpu: _Gpu, now: float, out: _SampleBuffer) -> None:
        wanted = [
            (spec, request)
            for spec, request in self._fields
            if ("field", (spec.sample_field,)) not in gpu.lane.unsupported
        ]
        if not wanted:
            return
        names = tuple(spec.sample_field for spec, _ in wanted)
        values = self._guard.call(
            gpu.lane, names, "nvmlDeviceGetFieldValues", gpu.handle, [req for _, req in wanted]
        )
        if values is None:
            return
        for (spec, _), value in zip(wanted, values, strict=False):
            self._take_field(gpu, spec, value, now, out)

    def _take_field(
        self, gpu: _Gpu, spec: _FieldSpec, value: Any, now: float, out: _SampleBuffer
    ) -> None:
        fields = (spec.sample_field,)
        if value.nvmlReturn != self._nvml.NVML_SUCCESS:
            error = self._guard.error_for(value.nvmlReturn)
            self._guard.degrade(gpu.lane, fields, ("field", fields), error)
            return
        member = self._value_members.get(value.valueType)
        if member is None:
            self._guard.degraded.record(fields, f"unknown valueType {value.valueType}")
            return
        raw = float(getattr(value.value, member))
        if spec.byte_counter:
            at_s = value.timestamp / 1e6 if value.timestamp > 0 else now
            rate = self._byte_rate(gpu, spec.sample_field, raw, member, at_s)
            if rate is not None:
                out.put(spec.sample_field, rate * spec.scale)
        else:
            out.put(spec.sample_field, raw * spec.scale)

    @staticmethod
    def _byte_rate(gpu: _Gpu, name: str, raw: float, member: str, at_s: float) -> float | None:
        """Bytes per second since the previous read of a cumulative counter, if any."""
        previous = gpu.byte_counters.get(name)
        gpu.byte_counters[name] = (raw, at_s)
        if previous is None:
            return None
        delta, elapsed = raw - previous[0], at_s - previous[1]
        if delta < 0 and member in _COUNTER_MODULUS:
            delta += _COUNTER_MODULUS[member]  # wrapped once (more wraps are undetectable)
        if delta < 0 or elapsed <= 0:
            return None
        return delta / elapsed

    def _read_utilization(self, gpu: _Gpu, out: _SampleBuffer) -> None:
        fields = ("util_gpu_pct", "util_mem_pct")
        util = self._guard.call(gpu.lane, fields, "nvmlDeviceGetUtilizationRates", gpu.handle)
        if util is not None:
            out.put("util_gpu_pct", util.gpu)
            out.put("util_mem_pct", util.memory)

    def _read_memory(self, gpu: _Gpu, out: _SampleBuffer) -> None:
        fields = ("mem_used_mib", "mem_total_mib")
        memory = self._guard.call(gpu.lane, fields, "nvmlDeviceGetMemoryInfo", gpu.handle)
        if memory is not None:
            out.put("mem_used_mib", memory.used / _MIB)
            out.put("mem_total_mib", memory.total / _MIB)

    def _read_scalar(self, gpu: _Gpu, read: _ScalarRead, out: _SampleBuffer) -> None:
        fields = (read.sample_field,)
        fn_name = next(
            (
                name
                for name in read.calls
                if (name, fields) not in gpu.lane.unsupported and hasattr(self._nvml, name)
            ),
            read.calls[0],  # none left: call() reports it as unsupported or missing
        )
        extra = () if read.arg_name is None else (getattr(self._nvml, read.arg_name),)
        value = self._guard.call(gpu.lane, fields, fn_name, gpu.handle, *extra)
        if value is not None:
            out.put(read.sample_field, value * read.scale)

    def _read_gpm(self, gpu: _Gpu, now: float, out: _SampleBuffer) -> None:
        state = gpu.gpm
        if state is None:
            return
        elapsed = None if state.previous_at is None else now - state.previous_at
        if elapsed is not None and 0 <= elapsed < GPM_MIN_INTERVAL_S:
            return  # too soon: keep the older sample so the next interval is long enough
        taken = self._guard.call(gpu.lane, _GPM_FIELDS, "nvmlGpmSampleGet", gpu.handle, state.spare)
        if taken is None:
            return
        if elapsed is not None and elapsed >= 0:
            self._gpm_metrics(gpu, state.previous, state.spare, out)
        state.previous, state.spare, state.previous_at = state.spare, state.previous, now

    def _gpm_metrics(self, gpu: _Gpu, older: Any, newer: Any, out: _SampleBuffer) -> None:
        request = self._nvml.c_nvmlGpmMetricsGet_t()
        request.version = self._nvml.NVML_GPM_METRICS_GET_VERSION
        request.numMetrics = len(_GPM_METRICS)
        request.sample1, request.sample2 = older, newer
        for slot, (_, metric_name) in enumerate(_GPM_METRICS):
            request.metrics[slot].metricId = getattr(self._nvml, metric_name)
        if self._guard.call(gpu.lane, _GPM_FIELDS, "nvmlGpmMetricsGet", request) is None:
            return
        for slot, (name, _) in enumerate(_GPM_METRICS):
            metric = request.metrics[slot]
            if metric.nvmlReturn == self._nvml.NVML_SUCCESS:
                out.put(name, metric.value)
            else:
                error = self._guard.error_for(metric.nvmlReturn)
                self._guard.degrade(gpu.lane, (name,), ("gpm", (name,)), error)

    def _read_processes(self, gpu: _Gpu) -> list[GpuProcess]:
        found = self._guard.call(
            gpu.lane, ("processes",), "nvmlDeviceGetComputeRunningProcesses", gpu.handle
        )
        return [
            GpuProcess(gpu.index, int(proc.pid), _used_memory_mib(proc.usedGpuMemory))
            for proc in found or ()
        ]

    def _free_gpm(self, gpu: _Gpu) -> None:
        state, gpu.gpm = gpu.gpm, None
        for buffer in () if state is None else (state.previous, state.spare):
            self._guard.call(
                gpu.lane, ("gpm_free",), "nvmlGpmSampleFree", buffer, even_if_lost=True
            )

    def _live_gpus(self) -> list[_Gpu]:
        return [gpu for gpu in self._gpus if gpu.handle is not None and not gpu.lane.lost]

    def _require_open(self) -> None:
        if self._closed:
            raise NvmlError("the NVML collector is closed")


def open_nvml(
    nvml_module: NvmlModule | None = None,
    *,
    clock: Callable[[], float] = time.time,
    call_timeout_s: float = DEFAULT_CALL_TIMEOUT_S,
    hostname: str | None = None,
) -> NvmlCollector | None:
    """Start NVML and cache handles and static facts; None when this host has no NVML/GPU.

    ``nvml_module`` defaults to ``import pynvml``; ``clock`` gives wall seconds for tick
    timestamps; ``call_timeout_s`` bounds every single NVML call. None is the CPU path (the
    caller falls back to replay); an NVML that is present but broken raises NvmlInitError.
    """
    nvml = nvml_module if nvml_module is not None else _import_pynvml()
    if nvml is None:
        return None
    guard = _GuardedNvml(nvml, call_timeout_s, _DegradedReads(CollectorHealth()))
    host = _Lane("host")
    started = False
    try:
        started = _init_nvml(guard, host)
    finally:
        if not started:
            host.worker.stop()
    if not started:
        return None
    count = guard.run(host, partial(guard.call, host, ("gpu_count",), "nvmlDeviceGetCount"))
    if not count:
        guard.run(host, partial(guard.call, host, ("shutdown",), "nvmlShutdown"))
        host.worker.stop()
        if count is None:
            raise NvmlInitError("NVML started but could not count GPUs")
        log.info("NVML reports no GPUs on this host")
        return None
    gpus = [_open_gpu(guard, index) for index in range(count)]
    collector = NvmlCollector(guard, host, gpus, clock, hostname or socket.gethostname())
    collector._load_static_facts()
    return collector


def _import_pynvml() -> NvmlModule | None:
    try:
        import pynvml
    except ImportError:
        log.info("nvidia-ml-py (pynvml) is not installed: no live GPU collection")
        return None
    return pynvml


def _init_nvml(guard: _GuardedNvml, host: _Lane) -> bool:
    """True once nvmlInit succeeded; False when NVML is simply absent or hangs."""
    nvml = guard.nvml
    future = host.worker.submit(nvml.nvmlInit)
    try:
        host.worker.wait(future, guard.timeout_s)
    except _CallTimeoutError:
        log.error("nvmlInit did not return within %g s; treating NVML as absent", guard.timeout_s)
        return False
    except (nvml.NVMLError_LibraryNotFound, nvml.NVMLError_DriverNotLoaded) as exc:
        log.info("NVML absent (%s): no live GPU collection", type(exc).__name__)
        return False
    except nvml.NVMLError as exc:
        raise NvmlInitError(f"nvmlInit failed: {type(exc).__name__}") from exc
    return True


def _open_gpu(guard: _GuardedNvml, index: int) -> _Gpu:
    """A GPU with its own worker and cached handle (None, and skipped, if unobtainable)."""
    gpu = _Gpu(index=index, lane=_Lane(f"gpu{index}"))
    gpu.handle = guard.run(
        gpu.lane, partial(guard.call, gpu.lane, ("handle",), "nvmlDeviceGetHandleByIndex", index)
    )
    return gpu
