"""NvmlCollector against a fake pynvml: values and units, degraded reads, hangs, GPM, MIG."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator

import pynvml
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.collectors.nvml import NvmlCollector, NvmlError, NvmlInitError, open_nvml
from agent.samples import GpuDescription, GpuProcess, MigDescription, Tick
from tests.agent.collectors.fake_pynvml import GIB, FakeGpu, FakeMig, FakeNvml

MIB = 1 << 20
HOSTNAME = "node-7"
GPM_FIELDS = {"sm_active_pct", "sm_occupancy_pct", "tensor_active_pct", "dram_bw_pct"}
FIELD_VALUE_FIELDS = {
    "power_w",
    "energy_mj",
    "pcie_tx_kib_s",
    "pcie_rx_kib_s",
    "nvlink_tx_kib",
    "nvlink_rx_kib",
}


class FakeClock:
    """Wall seconds that move only when a test says so."""

    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def hopper() -> FakeGpu:
    return FakeGpu(
        uuid="GPU-11111111-1111-4111-8111-111111111111",
        memory_used_bytes=10 * GIB,
        util_gpu=97,
        util_memory=41,
        power_usage_mw=650_500,
        power_instant_mw=688_250,
        power_limit_mw=700_000,
        energy_mj=5_000_000,
        sm_clock_mhz=1980,
        mem_clock_mhz=2619,
        temperature_c=71,
        clocks_event_reasons=0x4,
        nvlink_tx_kib=1000,
        nvlink_rx_kib=2000,
        gpm_metrics={
            pynvml.NVML_GPM_METRIC_SM_UTIL: 88.5,
            pynvml.NVML_GPM_METRIC_SM_OCCUPANCY: 40.25,
            pynvml.NVML_GPM_METRIC_ANY_TENSOR_UTIL: 61.0,
            pynvml.NVML_GPM_METRIC_DRAM_BW_UTIL: 33.5,
        },
        processes=[(4242, 9 * GIB)],
    )


def ampere() -> FakeGpu:
    return FakeGpu(
        name="NVIDIA A100-SXM4-80GB",
        uuid="GPU-22222222-2222-4222-8222-222222222222",
        memory_used_bytes=512 * MIB,
        util_gpu=3,
        util_memory=1,
        power_usage_mw=61_000,
        power_instant_mw=60_000,
        power_limit_mw=400_000,
        energy_mj=7_000_000,
        sm_clock_mhz=210,
        mem_clock_mhz=1593,
        temperature_c=33,
        clocks_event_reasons=0x1,
        gpm_supported=False,
        mig_capable=False,
    )


EXPECTED_SECOND_TICK = {
    0: {
        "power_w": 688.25,
        "power_avg_w": 650.5,
        "energy_mj": 5_000_000.0,
        "util_gpu_pct": 97.0,
        "util_mem_pct": 41.0,
        "mem_used_mib": 10_240.0,
        "mem_total_mib": 81_920.0,
        "sm_clock_mhz": 1980.0,
        "mem_clock_mhz": 2619.0,
        "temperature_c": 71.0,
        "throttle_reasons": 4.0,
        "pcie_tx_kib_s": 2048.0,  # 2 MiB over 1 s
        "pcie_rx_kib_s": 1024.0,
        "nvlink_tx_kib": 1000.0,
        "nvlink_rx_kib": 2000.0,
        "sm_active_pct": 88.5,
        "sm_occupancy_pct": 40.25,
        "tensor_active_pct": 61.0,
        "dram_bw_pct": 33.5,
    },
    1: {
        "power_w": 60.0,
        "power_avg_w": 61.0,
        "energy_mj": 7_000_000.0,
        "util_gpu_pct": 3.0,
        "util_mem_pct": 1.0,
        "mem_used_mib": 512.0,
        "mem_total_mib": 81_920.0,
        "sm_clock_mhz": 210.0,
        "mem_clock_mhz": 1593.0,
        "temperature_c": 33.0,
        "throttle_reasons": 1.0,
        "pcie_tx_kib_s": 2048.0,
        "pcie_rx_kib_s": 1024.0,
        "nvlink_tx_kib": 0.0,
        "nvlink_rx_kib": 0.0,
    },
}


@pytest.fixture
def fake() -> FakeNvml:
    return FakeNvml([hopper(), ampere()])


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def start(fake: FakeNvml, clock: FakeClock, timeout_s: float = 5.0) -> NvmlCollector:
    collector = open_nvml(fake, clock=clock, call_timeout_s=timeout_s, hostname=HOSTNAME)
    assert collector is not None
    return collector


@pytest.fixture
def collector(fake: FakeNvml, clock: FakeClock) -> Iterator[NvmlCollector]:
    opened = start(fake, clock)
    yield opened
    opened.close()


def advance(fake: FakeNvml, clock: FakeClock, seconds: float = 1.0) -> None:
    """Time passes: the clock, field timestamps and PCIe byte counters move on."""
    clock.now += seconds
    fake.timestamp_us += int(seconds * 1e6)
    for gpu in fake.gpus:
        gpu.pcie_tx_bytes += int(2 * MIB * seconds)
        gpu.pcie_rx_bytes += int(1 * MIB * seconds)


def by_gpu(tick: Tick) -> dict[int, dict[str, float]]:
    return {sample.gpu_index: sample.values for sample in tick.samples}


def second_tick(collector: NvmlCollector, fake: FakeNvml, clock: FakeClock) -> Tick:
    collector.read_tick()
    advance(fake, clock)
    return collector.read_tick()


# Values and units -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("gpu_index", "expected"),
    [
        pytest.param(0, EXPECTED_SECOND_TICK[0], id="hopper-with-gpm"),
        pytest.param(1, EXPECTED_SECOND_TICK[1], id="ampere-without-gpm"),
    ],
)
def test_full_read_gives_canonical_values_and_units(
    collector: NvmlCollector,
    fake: FakeNvml,
    clock: FakeClock,
    gpu_index: int,
    expected: dict[str, float],
) -> None:
    tick = second_tick(collector, fake, clock)
    assert tick.t_unix_s == clock.now
    assert by_gpu(tick)[gpu_index] == pytest.approx(expected)
    assert collector.health.errors_by_field == {}


def test_first_tick_has_no_rates_and_no_gpm_yet(collector: NvmlCollector) -> None:
    values = by_gpu(collector.read_tick())[0]
    assert set(EXPECTED_SECOND_TICK[0]) - set(values) == {
        "pcie_tx_kib_s",
        "pcie_rx_kib_s",
        *GPM_FIELDS,
    }


def test_describe_host_reports_static_facts(collector: NvmlCollector) -> None:
    host = collector.describe_host()
    assert (host.hostname, host.driver_version, host.nvml_version) == (
        HOSTNAME,
        "550.54.15",
        "12.550.54.15",
    )
    assert host.gpus == (
        GpuDescription(
            index=0,
            uuid="GPU-11111111-1111-4111-8111-111111111111",
            name="NVIDIA H100 80GB HBM3",
            memory_total_mib=81_920,
            power_limit_w=700.0,
            gpm_supported=True,
        ),
        GpuDescription(
            index=1,
            uuid="GPU-22222222-2222-4222-8222-222222222222",
            name="NVIDIA A100-SXM4-80GB",
            memory_total_mib=81_920,
            power_limit_w=400.0,
            gpm_supported=False,
        ),
    )
    assert collector.source == "nvml"


# Degraded reads ---------------------------------------------------------------------------

CALL_ERRORS = [
    pytest.param(
        "nvmlDeviceGetPowerUsage",
        pynvml.NVML_ERROR_NOT_SUPPORTED,
        {"power_avg_w"},
        id="power-average-not-supported",
    ),
    pytest.param(
        "nvmlDeviceGetUtilizationRates",
        pynvml.NVML_ERROR_NO_PERMISSION,
        {"util_gpu_pct", "util_mem_pct"},
        id="utilization-no-permission",
    ),
    pytest.param(
        "nvmlDeviceGetMemoryInfo",
        pynvml.NVML_ERROR_UNKNOWN,
        {"mem_used_mib", "mem_total_mib"},
        id="memory-unknown-error",
    ),
    pytest.param(
        "nvmlDeviceGetClockInfo",
        pynvml.NVML_ERROR_TIMEOUT,
        {"sm_clock_mhz", "mem_clock_mhz"},
        id="clocks-nvml-timeout",
    ),
    pytest.param(
        "nvmlDeviceGetTemperatureV",
        pynvml.NVML_ERROR_NO_PERMISSION,
        {"temperature_c"},
        id="temperature-no-permission",
    ),
    pytest.param(
        "nvmlDeviceGetFieldValues",
        pynvml.NVML_ERROR_UNKNOWN,
        FIELD_VALUE_FIELDS,
        id="field-values-call-fails",
    ),
    pytest.param(
        "nvmlGpmSampleGet", pynvml.NVML_ERROR_NO_PERMISSION, GPM_FIELDS, id="gpm-sample-fails"
    ),
    pytest.param("nvmlGpmMetricsGet", pynvml.NVML_ERROR_UNKNOWN, GPM_FIELDS, id="gpm-metrics-fail"),
]


@pytest.mark.parametrize(("fn_name", "code", "lost_fields"), CALL_ERRORS)
def test_call_error_degrades_only_its_fields(
    collector: NvmlCollector,
    fake: FakeNvml,
    clock: FakeClock,
    fn_name: str,
    code: int,
    lost_fields: set[str],
) -> None:
    collector.read_tick()
    advance(fake, clock)
    fake.fail(fn_name, code, gpu=0)
    values = by_gpu(collector.read_tick())
    assert set(values[0]) == set(EXPECTED_SECOND_TICK[0]) - lost_fields
    assert values[1] == pytest.approx(EXPECTED_SECOND_TICK[1])
    assert collector.health.errors_by_field == dict.fromkeys(lost_fields, 1)


FIELD_ERRORS = [
    pytest.param(
        pynvml.NVML_FI_DEV_POWER_INSTANT, pynvml.NVML_ERROR_NOT_SUPPORTED, "power_w", id="power"
    ),
    pytest.param(
        pynvml.NVML_FI_DEV_TOTAL_ENERGY_CONSUMPTION,
        pynvml.NVML_ERROR_NO_PERMISSION,
        "energy_mj",
        id="energy",
    ),
    pytest.param(
        pynvml.NVML_FI_DEV_PCIE_COUNT_TX_BYTES,
        pynvml.NVML_ERROR_UNKNOWN,
        "pcie_tx_kib_s",
        id="pcie-tx",
    ),
    pytest.param(
        pynvml.NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_RX,
        pynvml.NVML_ERROR_NOT_SUPPORTED,
        "nvlink_rx_kib",
        id="nvlink-rx",
    ),
]


@pytest.mark.parametrize(("field_id", "code", "lost_field"), FIELD_ERRORS)
def test_field_value_error_degrades_only_that_field(
    collector: NvmlCollector,
    fake: FakeNvml,
    clock: FakeClock,
    field_id: int,
    code: int,
    lost_field: str,
) -> None:
    collector.read_tick()
    advance(fake, clock)
    fake.fail_field(0, field_id, code)
    values = by_gpu(collector.read_tick())
    assert set(values[0]) == set(EXPECTED_SECOND_TICK[0]) - {lost_field}
    assert set(values[1]) == set(EXPECTED_SECOND_TICK[1])
    assert collector.health.errors_by_field == {lost_field: 1}


GPM_METRIC_ERRORS = [
    pytest.param(
        pynvml.NVML_GPM_METRIC_ANY_TENSOR_UTIL,
        pynvml.NVML_ERROR_NOT_SUPPORTED,
        "tensor_active_pct",
        id="tensor-not-supported",
    ),
    pytest.param(
        pynvml.NVML_GPM_METRIC_DRAM_BW_UTIL,
        pynvml.NVML_ERROR_NO_PERMISSION,
        "dram_bw_pct",
        id="dram-no-permission",
    ),
]


@pytest.mark.parametrize(("metric_id", "code", "lost_field"), GPM_METRIC_ERRORS)
def test_gpm_metric_error_degrades_only_that_metric(
    collector: NvmlCollector,
    fake: FakeNvml,
    clock: FakeClock,
    metric_id: int,
    code: int,
    lost_field: str,
) -> None:
    fake.fail_gpm_metric(0, metric_id, code)
    values = by_gpu(second_tick(collector, fake, clock))[0]
    assert GPM_FIELDS & set(values) == GPM_FIELDS - {lost_field}
    assert collector.health.errors_by_field == {lost_field: 1}


def test_not_supported_call_is_not_asked_again(
    collector: NvmlCollector, fake: FakeNvml, clock: FakeClock
) -> None:
    fake.fail("nvmlDeviceGetPowerUsage", pynvml.NVML_ERROR_NOT_SUPPORTED, gpu=0)
    for _ in range(3):
        assert "power_avg_w" not in by_gpu(collector.read_tick())[0]
        advance(fake, clock)
    assert fake.device_calls[("nvmlDeviceGetPowerUsage", 0)] == 1
    assert fake.device_calls[("nvmlDeviceGetPowerUsage", 1)] == 3
    assert collector.health.errors_by_field == {"power_avg_w": 1}


def test_transient_error_is_retried_and_recovers(
    collector: NvmlCollector, fake: FakeNvml, clock: FakeClock
) -> None:
    fake.fail("nvmlDeviceGetPowerUsage", pynvml.NVML_ERROR_NO_PERMISSION, gpu=0)
    for _ in range(2):
        assert "power_avg_w" not in by_gpu(collector.read_tick())[0]
        advance(fake, clock)
    fake.heal()
    assert by_gpu(collector.read_tick())[0]["power_avg_w"] == pytest.approx(650.5)
    assert collector.health.errors_by_field == {"power_avg_w": 2}


def test_each_degraded_field_is_logged_once(
    collector: NvmlCollector,
    fake: FakeNvml,
    clock: FakeClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    fake.fail("nvmlDeviceGetUtilizationRates", pynvml.NVML_ERROR_NO_PERMISSION)
    with caplog.at_level(logging.WARNING, logger="agent.collectors.nvml"):
        for _ in range(3):
            collector.read_tick()
            advance(fake, clock)
    mentions = [r.getMessage() for r in caplog.records if "util_gpu_pct" in r.getMessage()]
    assert len(mentions) == 1
    assert "NVMLError_NoPermission" in mentions[0]
    assert collector.health.errors_by_field["util_gpu_pct"] == 6  # 2 GPUs x 3 ticks


def test_clock_event_reasons_fall_back_to_the_older_call(
    collector: NvmlCollector, fake: FakeNvml, clock: FakeClock
) -> None:
    # A driver older than the pynvml binding lacks the new symbol.
    fake.fail("nvmlDeviceGetCurrentClocksEventReasons", pynvml.NVML_ERROR_FUNCTION_NOT_FOUND)
    assert "throttle_reasons" not in by_gpu(collector.read_tick())[0]
    advance(fake, clock)
    assert by_gpu(collector.read_tick())[0]["throttle_reasons"] == 4.0
    assert fake.device_calls[("nvmlDeviceGetCurrentClocksThrottleReasons", 0)] == 1


# Lost GPUs and hung calls -----------------------------------------------------------------


def lose_every_call(fake: FakeNvml) -> None:
    fake.lose(1)


def lose_in_a_field_value(fake: FakeNvml) -> None:
    fake.fail_field(1, pynvml.NVML_FI_DEV_POWER_INSTANT, pynvml.NVML_ERROR_GPU_IS_LOST)


@pytest.mark.parametrize(
    "lose",
    [
        pytest.param(lose_every_call, id="every-call-fails"),
        pytest.param(lose_in_a_field_value, id="reported-in-a-field-value"),
    ],
)
def test_gpu_lost_mid_run_is_absent_thereafter(
    collector: NvmlCollector, fake: FakeNvml, clock: FakeClock, lose: Callable[[FakeNvml], None]
) -> None:
    assert set(by_gpu(collector.read_tick())) == {0, 1}
    lose(fake)
    advance(fake, clock)
    lost_tick = by_gpu(collector.read_tick())
    calls_on_lost_gpu = fake.calls_on(1)
    for _ in range(2):
        advance(fake, clock)
        assert set(by_gpu(collector.read_tick())) == {0}
    assert set(lost_tick[0]) == set(EXPECTED_SECOND_TICK[0])  # GPU 0 unaffected
    assert fake.calls_on(1) == calls_on_lost_gpu  # never asked again
    fake.gpus[0].processes = [(7, GIB)]
    fake.gpus[1].processes = [(8, GIB)]
    assert collector.processes() == [GpuProcess(0, 7, 1024)]


def test_hung_call_times_out_and_later_ticks_still_return(fake: FakeNvml, clock: FakeClock) -> None:
    collector = start(fake, clock, timeout_s=0.2)
    hang = fake.hang("nvmlDeviceGetPowerUsage", gpu=0)
    try:
        first = by_gpu(collector.read_tick())
        # Fields read before the stuck call are kept; the hung GPU does not block the other.
        assert {"power_w", "util_gpu_pct", "mem_used_mib"} <= set(first[0])
        assert "power_avg_w" not in first[0]
        assert set(first[1]) >= {"power_avg_w", "temperature_c"}
        advance(fake, clock)
        assert set(by_gpu(collector.read_tick())) == {1}  # still stuck: GPU 0 skipped
        assert collector.health.errors_by_field == {"power_avg_w": 2}
    finally:
        hang.release.set()
    assert hang.returned.wait(5.0)
    recovered = wait_for_gpu(collector, fake, clock, gpu_index=0)
    assert recovered["power_avg_w"] == pytest.approx(650.5)
    collector.close()


def wait_for_gpu(
    collector: NvmlCollector, fake: FakeNvml, clock: FakeClock, gpu_index: int
) -> dict[str, float]:
    """Tick until the GPU's abandoned job has finished and it reports again."""
    for _ in range(500):
        advance(fake, clock)
        values = by_gpu(collector.read_tick()).get(gpu_index)
        if values:
            return values
        time.sleep(0.01)
    raise AssertionError(f"GPU {gpu_index} never reported again")


def test_hung_init_counts_as_absent(fake: FakeNvml, clock: FakeClock) -> None:
    hang = fake.hang("nvmlInit")
    try:
        assert open_nvml(fake, clock=clock, call_timeout_s=0.2) is None
    finally:
        hang.release.set()


# GPM and MIG ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("gpu", "gpm_from_third_tick"),
    [
        pytest.param(hopper(), True, id="gpm-supported"),
        pytest.param(ampere(), False, id="gpm-unsupported"),
    ],
)
def test_gpm_metrics_only_when_supported_and_from_the_second_sample(
    clock: FakeClock, gpu: FakeGpu, gpm_from_third_tick: bool
) -> None:
    fake = FakeNvml([gpu])
    collector = start(fake, clock)
    first = by_gpu(collector.read_tick())[0]
    advance(fake, clock, 0.05)  # closer than NVML's 100 ms minimum: no new sample
    second = by_gpu(collector.read_tick())[0]
    samples_taken = fake.calls["nvmlGpmSampleGet"]
    advance(fake, clock, 1.0)
    third = by_gpu(collector.read_tick())[0]
    collector.close()
    assert not GPM_FIELDS & (set(first) | set(second))
    assert (set(third) >= GPM_FIELDS) is gpm_from_third_tick
    assert samples_taken == (1 if gpm_from_third_tick else 0)
    assert len(fake.samples) == (2 if gpm_from_third_tick else 0)
    assert all(sample.freed for sample in fake.samples)


@pytest.mark.parametrize(
    ("mig_capable", "instances", "expected"),
    [
        pytest.param(
            True,
            [FakeMig(1, 0, "MIG-aaaa", "1g.10gb"), FakeMig(2, 0, "MIG-bbbb", "3g.40gb")],
            (
                MigDescription(1, 0, "MIG-aaaa", "1g.10gb"),
                MigDescription(2, 0, "MIG-bbbb", "3g.40gb"),
            ),
            id="mig-enabled",
        ),
        pytest.param(True, [], (), id="mig-disabled"),
        pytest.param(False, [], (), id="mig-not-supported"),
    ],
)
def test_mig_instances_are_described(
    clock: FakeClock,
    mig_capable: bool,
    instances: list[FakeMig],
    expected: tuple[MigDescription, ...],
) -> None:
    gpu = hopper()
    gpu.mig_capable, gpu.mig = mig_capable, instances
    collector = start(FakeNvml([gpu]), clock)
    collector.close()
    assert collector.describe_host().gpus[0].mig_instances == expected
    assert collector.health.errors_by_field == {}


# Open, processes, close -------------------------------------------------------------------


@pytest.mark.parametrize(
    "code",
    [
        pytest.param(pynvml.NVML_ERROR_LIBRARY_NOT_FOUND, id="library-not-found"),
        pytest.param(pynvml.NVML_ERROR_DRIVER_NOT_LOADED, id="driver-not-loaded"),
    ],
)
def test_absent_nvml_gives_none(fake: FakeNvml, clock: FakeClock, code: int) -> None:
    fake.init_error = code
    assert open_nvml(fake, clock=clock) is None


@pytest.mark.parametrize(
    "code",
    [
        pytest.param(pynvml.NVML_ERROR_NO_PERMISSION, id="no-permission"),
        pytest.param(pynvml.NVML_ERROR_LIB_RM_VERSION_MISMATCH, id="driver-library-mismatch"),
        pytest.param(pynvml.NVML_ERROR_UNKNOWN, id="unknown"),
    ],
)
def test_broken_nvml_raises(fake: FakeNvml, clock: FakeClock, code: int) -> None:
    fake.init_error = code
    with pytest.raises(NvmlInitError):
        open_nvml(fake, clock=clock)


def test_no_gpus_gives_none_and_shuts_down(clock: FakeClock) -> None:
    fake = FakeNvml([])
    assert open_nvml(fake, clock=clock) is None
    assert fake.calls["nvmlShutdown"] == 1


def test_real_pynvml_without_a_driver_gives_none(clock: FakeClock) -> None:
    # Without a driver the real module raises NVMLError_LibraryNotFound at nvmlInit.
    collector = open_nvml(clock=clock)
    if collector is not None:
        collector.close()
        pytest.skip("an NVIDIA driver is present on this machine")


@pytest.mark.parametrize(
    ("running", "expected"),
    [
        pytest.param([(101, 3 * GIB)], [GpuProcess(0, 101, 3072)], id="with-used-memory"),
        pytest.param([(102, None)], [GpuProcess(0, 102, 0)], id="used-memory-not-available"),
        pytest.param(
            [(103, (1 << 64) - 1)], [GpuProcess(0, 103, 0)], id="raw-not-available-sentinel"
        ),
        pytest.param([], [], id="no-processes"),
    ],
)
def test_processes(
    collector: NvmlCollector,
    fake: FakeNvml,
    running: list[tuple[int, int | None]],
    expected: list[GpuProcess],
) -> None:
    fake.gpus[0].processes = running
    fake.gpus[1].processes = [(200, GIB // 2)]
    assert collector.processes() == [*expected, GpuProcess(1, 200, 512)]


def test_processes_error_is_counted(collector: NvmlCollector, fake: FakeNvml) -> None:
    fake.fail("nvmlDeviceGetComputeRunningProcesses", pynvml.NVML_ERROR_NO_PERMISSION, gpu=1)
    assert collector.processes() == [GpuProcess(0, 4242, 9216)]
    assert collector.health.errors_by_field == {"processes": 1}


def test_close_shuts_nvml_down_once(fake: FakeNvml, clock: FakeClock) -> None:
    collector = start(fake, clock)
    collector.read_tick()
    collector.close()
    collector.close()
    assert fake.calls["nvmlShutdown"] == 1
    assert not fake.initialized
    with pytest.raises(NvmlError):
        collector.read_tick()


# Counter wrap -----------------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(
    start_bytes=st.integers(0, (1 << 32) - 1),
    delta_bytes=st.integers(0, (1 << 32) - 1),
    elapsed_us=st.integers(1_000, 100_000_000),
)
def test_pcie_rate_survives_a_32_bit_counter_wrap(
    start_bytes: int, delta_bytes: int, elapsed_us: int
) -> None:
    fake = FakeNvml([ampere()])
    fake.value_types[pynvml.NVML_FI_DEV_PCIE_COUNT_TX_BYTES] = pynvml.NVML_VALUE_TYPE_UNSIGNED_INT
    fake.gpus[0].pcie_tx_bytes = start_bytes
    collector = start(fake, FakeClock())
    try:
        collector.read_tick()
        fake.gpus[0].pcie_tx_bytes += delta_bytes  # the fake reports it modulo 2**32
        fake.timestamp_us += elapsed_us
        rate = by_gpu(collector.read_tick())[0]["pcie_tx_kib_s"]
    finally:
        collector.close()
    assert rate == pytest.approx(delta_bytes / 1024 / (elapsed_us / 1e6))
