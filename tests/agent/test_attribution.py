"""Attribution of GPU processes to jobs from fake ``/proc/<pid>/cgroup`` trees.

Every cgroup file here is synthetic: written into ``tmp_path`` by the helpers below, with
made-up pod UIDs and container ids.
"""

from __future__ import annotations

import errno
import re
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.attribution import (
    MAX_CGROUP_FILE_BYTES,
    AttributionReason,
    JobAttribution,
    JobKind,
    attribute_cgroup_path,
    attribute_cgroup_text,
    attribute_process,
    attribute_processes,
)
from agent.samples import GpuProcess

# Synthetic identifiers in the shapes the real managers use.
POD_UID = "0f1e2d3c-4b5a-4968-8776-a5b4c3d2e1f0"
POD_UID_ESCAPED = POD_UID.replace("-", "_")
OTHER_POD_UID = "11111111-2222-4333-8444-555555555555"
STATIC_POD_UID = "c0ffee00c0ffee00c0ffee00c0ffee00"
CONTAINER_ID = "ab" * 32
OTHER_CONTAINER_ID = "cd" * 32

Reason = AttributionReason


# --- fake /proc tree builders -------------------------------------------------------------


def write_proc_cgroup(proc_root: Path, pid: int, content: str | bytes) -> Path:
    """Create ``<proc_root>/<pid>/cgroup`` holding ``content``; return the file."""
    cgroup_file = proc_root / str(pid) / "cgroup"
    cgroup_file.parent.mkdir(parents=True, exist_ok=True)
    data = content.encode() if isinstance(content, str) else content
    cgroup_file.write_bytes(data)
    return cgroup_file


def v2(path: str) -> str:
    """A cgroup v2 file: one unified line."""
    return f"0::{path}\n"


def v1(memory: str, pids: str = "/", cpu: str = "/", systemd: str = "/") -> str:
    """A cgroup v1 (legacy) file with the usual controllers, as a kernel prints it."""
    return (
        "12:hugetlb:/\n"
        f"11:memory:{memory}\n"
        "10:devices:/\n"
        f"9:pids:{pids}\n"
        f"4:cpu,cpuacct:{cpu}\n"
        "3:net_cls,net_prio:/\n"
        f"1:name=systemd:{systemd}\n"
    )


def v1_all(path: str) -> str:
    """A cgroup v1 file where every controller shows the same path (systemd driver)."""
    return v1(memory=path, pids=path, cpu=path, systemd=path)


# --- the table ----------------------------------------------------------------------------

K8S_SYSTEMD_BURSTABLE = (
    "/kubepods.slice/kubepods-burstable.slice/"
    f"kubepods-burstable-pod{POD_UID_ESCAPED}.slice/cri-containerd-{CONTAINER_ID}.scope"
)
K8S_SYSTEMD_BESTEFFORT_CRIO = (
    "/kubepods.slice/kubepods-besteffort.slice/"
    f"kubepods-besteffort-pod{POD_UID_ESCAPED}.slice/crio-{CONTAINER_ID}.scope"
)
K8S_SYSTEMD_GUARANTEED = (
    f"/kubepods.slice/kubepods-pod{POD_UID_ESCAPED}.slice/cri-containerd-{CONTAINER_ID}.scope"
)
K8S_SYSTEMD_STATIC = (
    "/kubepods.slice/kubepods-burstable.slice/"
    f"kubepods-burstable-pod{STATIC_POD_UID}.slice/cri-containerd-{CONTAINER_ID}.scope"
)
K8S_CGROUPFS_BESTEFFORT = f"/kubepods/besteffort/pod{POD_UID}/{CONTAINER_ID}"
K8S_CGROUPFS_GUARANTEED = f"/kubepods/pod{POD_UID}/{CONTAINER_ID}"
SLURM_V2 = "/system.slice/slurmstepd.scope/job_4242/step_0/user/task_0"
SLURM_V2_MULTI_SLURMD = "/system.slice/gpu07_slurmstepd.scope/job_17/step_batch/user/task_0"
SLURM_V1 = "/slurm/uid_1000/job_99/step_0/task_0"
DOCKER_SYSTEMD = f"/system.slice/docker-{CONTAINER_ID}.scope"
DOCKER_CGROUPFS = f"/docker/{CONTAINER_ID}"
CONTAINERD_CHILD = (
    "/system.slice/containerd.service/"
    f"kubepods-besteffort-pod{POD_UID_ESCAPED}.slice:cri-containerd:{CONTAINER_ID}"
)
PODMAN_SYSTEMD = f"/machine.slice/libpod-{CONTAINER_ID}.scope/container"
PODMAN_CGROUPFS = f"/libpod_parent/libpod-{CONTAINER_ID}"
SYSTEMD_SERVICE = "/system.slice/inference-server.service"
SYSTEMD_TEMPLATE_IN_SUBSLICE = "/system.slice/system-trainer.slice/trainer@3.service"
USER_SESSION = "/user.slice/user-1000.slice/session-3.scope"
USER_MANAGER = "/user.slice/user-1000.slice/user@1000.service/app.slice/app-jupyter.service"

# Workload cgroups (where a job's own processes run): the suffix-stability property below
# appends arbitrary workload-created groups to each and expects the same job.
WORKLOAD_PATHS = {
    K8S_SYSTEMD_BURSTABLE: (JobKind.KUBERNETES_POD, POD_UID),
    K8S_SYSTEMD_BESTEFFORT_CRIO: (JobKind.KUBERNETES_POD, POD_UID),
    K8S_SYSTEMD_GUARANTEED: (JobKind.KUBERNETES_POD, POD_UID),
    K8S_SYSTEMD_STATIC: (JobKind.KUBERNETES_POD, STATIC_POD_UID),
    K8S_CGROUPFS_BESTEFFORT: (JobKind.KUBERNETES_POD, POD_UID),
    K8S_CGROUPFS_GUARANTEED: (JobKind.KUBERNETES_POD, POD_UID),
    SLURM_V2: (JobKind.SLURM_JOB, "4242"),
    SLURM_V2_MULTI_SLURMD: (JobKind.SLURM_JOB, "17"),
    SLURM_V1: (JobKind.SLURM_JOB, "99"),
    DOCKER_SYSTEMD: (JobKind.CONTAINER, CONTAINER_ID),
    DOCKER_CGROUPFS: (JobKind.CONTAINER, CONTAINER_ID),
    CONTAINERD_CHILD: (JobKind.CONTAINER, CONTAINER_ID),
    PODMAN_SYSTEMD: (JobKind.CONTAINER, CONTAINER_ID),
    PODMAN_CGROUPFS: (JobKind.CONTAINER, CONTAINER_ID),
    SYSTEMD_SERVICE: (JobKind.SYSTEMD_UNIT, "inference-server.service"),
    SYSTEMD_TEMPLATE_IN_SUBSLICE: (JobKind.SYSTEMD_UNIT, "trainer@3.service"),
    USER_SESSION: (JobKind.SYSTEMD_UNIT, "session-3.scope"),
    USER_MANAGER: (JobKind.SYSTEMD_UNIT, "user@1000.service"),
}

# Spoofing attempts: groups a workload creates below a delegated or container group, named
# like an orchestrator's. They must give the outer, trustworthy job, never the mimicked one.
USER_MANAGER_PREFIX = "/user.slice/user-1000.slice/user@1000.service"
SPOOF_KUBEPODS_IN_USER_MANAGER = (
    f"{USER_MANAGER_PREFIX}/app.slice/kubepods-pod{POD_UID_ESCAPED}.slice/"
    f"cri-containerd-{CONTAINER_ID}.scope"
)
SPOOF_ROOTLESS_PODMAN = f"{USER_MANAGER_PREFIX}/user.slice/libpod-{CONTAINER_ID}.scope"
SPOOF_SLURM_IN_USER_MANAGER = f"{USER_MANAGER_PREFIX}/system.slice/slurmstepd.scope/job_5/step_0"
SPOOF_KUBEPODS_IN_DOCKER = f"{DOCKER_SYSTEMD}/kubepods/pod{OTHER_POD_UID}/{OTHER_CONTAINER_ID}"
SPOOF_SLURM_IN_DOCKER = f"{DOCKER_SYSTEMD}/system.slice/slurmstepd.scope/job_1/step_0"
DOCKER_IN_DOCKER = f"{DOCKER_CGROUPFS}/docker/{OTHER_CONTAINER_ID}"
SPOOF_POD_IN_POD = f"{K8S_CGROUPFS_BESTEFFORT}/kubepods/pod{OTHER_POD_UID}"
SPOOF_JOB_IN_JOB = f"{SLURM_V2}/system.slice/slurmstepd.scope/job_1"
SPOOF_KUBEPODS_IN_SERVICE = (
    f"/system.slice/evil.service/kubepods.slice/kubepods-pod{POD_UID_ESCAPED}.slice"
)
# Slurm's cgroup/v1 plugin moves tasks in memory (and freezer) only; systemd keeps them in
# slurmd.service in the other hierarchies.
SLURM_V1_FILE = v1(
    memory=SLURM_V1, pids="/system.slice/slurmd.service", systemd="/system.slice/slurmd.service"
)
# Hybrid mode: the unified line shows the root, the memory controller holds the pod.
HYBRID_FILE = "0::/\n" + v1(memory=K8S_CGROUPFS_GUARANTEED)

POD = JobKind.KUBERNETES_POD
SLURM = JobKind.SLURM_JOB
CONTAINER = JobKind.CONTAINER
UNIT = JobKind.SYSTEMD_UNIT

ATTRIBUTED_CASES = [
    pytest.param(v2(K8S_SYSTEMD_BURSTABLE), POD, POD_UID, id="k8s-systemd-burstable-v2"),
    pytest.param(v2(K8S_SYSTEMD_BESTEFFORT_CRIO), POD, POD_UID, id="k8s-systemd-crio-v2"),
    pytest.param(v2(K8S_SYSTEMD_GUARANTEED), POD, POD_UID, id="k8s-systemd-guaranteed-v2"),
    pytest.param(v2(K8S_SYSTEMD_STATIC), POD, STATIC_POD_UID, id="k8s-systemd-static-pod-v2"),
    pytest.param(v1_all(K8S_SYSTEMD_BURSTABLE), POD, POD_UID, id="k8s-systemd-burstable-v1"),
    pytest.param(v2(K8S_CGROUPFS_BESTEFFORT), POD, POD_UID, id="k8s-cgroupfs-besteffort-v2"),
    pytest.param(v1_all(K8S_CGROUPFS_GUARANTEED), POD, POD_UID, id="k8s-cgroupfs-guaranteed-v1"),
    pytest.param(HYBRID_FILE, POD, POD_UID, id="hybrid-unified-root-v1-pod"),
    pytest.param(v2(SLURM_V2), SLURM, "4242", id="slurm-v2"),
    pytest.param(v2(SLURM_V2_MULTI_SLURMD), SLURM, "17", id="slurm-v2-multiple-slurmd"),
    pytest.param(SLURM_V1_FILE, SLURM, "99", id="slurm-v1-memory-beats-slurmd-unit"),
    pytest.param(
        v2("/system.slice/slurmstepd.scope/system"), UNIT, "slurmstepd.scope", id="slurmstepd"
    ),
    pytest.param(v2(DOCKER_SYSTEMD), CONTAINER, CONTAINER_ID, id="docker-systemd-v2"),
    pytest.param(v1_all(DOCKER_CGROUPFS), CONTAINER, CONTAINER_ID, id="docker-cgroupfs-v1"),
    pytest.param(v2(CONTAINERD_CHILD), CONTAINER, CONTAINER_ID, id="containerd-service-child"),
    pytest.param(
        v2("/system.slice/containerd.service"), UNIT, "containerd.service", id="containerd"
    ),
    pytest.param(v2(PODMAN_SYSTEMD), CONTAINER, CONTAINER_ID, id="podman-systemd-v2"),
    pytest.param(v1_all(PODMAN_CGROUPFS), CONTAINER, CONTAINER_ID, id="podman-cgroupfs-v1"),
    pytest.param(v2(SYSTEMD_SERVICE), UNIT, "inference-server.service", id="systemd-service"),
    pytest.param(
        v2(SYSTEMD_TEMPLATE_IN_SUBSLICE), UNIT, "trainer@3.service", id="systemd-in-subslice"
    ),
    pytest.param(v2(USER_SESSION), UNIT, "session-3.scope", id="user-session-scope"),
    pytest.param(v2(USER_MANAGER), UNIT, "user@1000.service", id="user-manager-units"),
    pytest.param(v2(K8S_SYSTEMD_BURSTABLE).rstrip("\n"), POD, POD_UID, id="no-trailing-newline"),
    pytest.param(
        v2(SPOOF_KUBEPODS_IN_USER_MANAGER), UNIT, "user@1000.service", id="spoof-pod-in-user"
    ),
    pytest.param(
        v2(SPOOF_ROOTLESS_PODMAN), UNIT, "user@1000.service", id="spoof-rootless-podman-scope"
    ),
    pytest.param(
        v2(SPOOF_SLURM_IN_USER_MANAGER), UNIT, "user@1000.service", id="spoof-slurm-in-user"
    ),
    pytest.param(
        v2(SPOOF_KUBEPODS_IN_DOCKER), CONTAINER, CONTAINER_ID, id="spoof-pod-in-docker-scope"
    ),
    pytest.param(
        v2(SPOOF_SLURM_IN_DOCKER), CONTAINER, CONTAINER_ID, id="spoof-slurm-in-docker-scope"
    ),
    pytest.param(v2(DOCKER_IN_DOCKER), CONTAINER, CONTAINER_ID, id="docker-in-docker-outer"),
    pytest.param(v2(SPOOF_POD_IN_POD), POD, POD_UID, id="spoof-pod-inside-pod"),
    pytest.param(v2(SPOOF_JOB_IN_JOB), SLURM, "4242", id="spoof-job-inside-job"),
    pytest.param(
        v2(SPOOF_KUBEPODS_IN_SERVICE), UNIT, "evil.service", id="spoof-pod-in-delegated-unit"
    ),
]

UNATTRIBUTED_CASES = [
    pytest.param(
        v2(f"/foo/kubepods/pod{POD_UID}/{CONTAINER_ID}"),
        Reason.UNRECOGNISED,
        id="kubepods-not-at-root",
    ),
    pytest.param(
        v2(f"/kubepods.slice/kubepods-pod{POD_UID}.slice/x.scope"),
        Reason.UNRECOGNISED,
        id="pod-uid-unescaped-in-slice-name",
    ),
    pytest.param(
        v2(
            "/kubepods.slice/kubepods-burstable.slice/"
            f"kubepods-besteffort-pod{POD_UID_ESCAPED}.slice/x.scope"
        ),
        Reason.UNRECOGNISED,
        id="pod-slice-in-wrong-qos-slice",
    ),
    pytest.param(
        v2("/system.slice/user-1000.slice/session-1.scope"),
        Reason.UNRECOGNISED,
        id="slice-outside-its-parent",
    ),
    pytest.param(v2("/docker/abc123"), Reason.UNRECOGNISED, id="docker-short-id"),
    pytest.param(v2("/slurm/uid_1000/step_0"), Reason.UNRECOGNISED, id="slurm-v1-without-job"),
    pytest.param(v2("/system.slice"), Reason.UNRECOGNISED, id="bare-slice"),
    pytest.param(v2("/"), Reason.CGROUP_NAMESPACE, id="namespace-root-only"),
    pytest.param(
        v2(f"/../../kubepods/pod{POD_UID}/{CONTAINER_ID}"),
        Reason.CGROUP_NAMESPACE,
        id="outside-reader-namespace",
    ),
    pytest.param(
        v2(f"/kubepods/pod{POD_UID}/../../docker/{CONTAINER_ID}"),
        Reason.CGROUP_NAMESPACE,
        id="dotdot-in-the-middle",
    ),
    pytest.param(v2(f"kubepods/pod{POD_UID}"), Reason.MALFORMED, id="relative-path"),
    pytest.param(v2(f"/docker//{CONTAINER_ID}"), Reason.MALFORMED, id="empty-component"),
    pytest.param(v2(f"/./docker/{CONTAINER_ID}"), Reason.MALFORMED, id="dot-component"),
    pytest.param("", Reason.MALFORMED, id="empty-file"),
    pytest.param("hello world\n:::\n\n", Reason.MALFORMED, id="garbage-lines"),
    pytest.param(b"\x00\xff\xfe0::\x00/docker\n\x80\x81", Reason.MALFORMED, id="binary"),
    pytest.param(f"1:name=systemd:{DOCKER_SYSTEMD}\n", Reason.MALFORMED, id="named-hierarchy"),
    pytest.param(f"0:memory:{DOCKER_SYSTEMD}\n", Reason.MALFORMED, id="unified-with-controllers"),
    pytest.param(f"x::{DOCKER_SYSTEMD}\n", Reason.MALFORMED, id="non-numeric-hierarchy"),
    pytest.param(f"\u0660::{DOCKER_SYSTEMD}\n", Reason.MALFORMED, id="unicode-digit-hierarchy"),
    pytest.param(f"{'9' * 5000}:memory:{DOCKER_SYSTEMD}\n", Reason.MALFORMED, id="huge-number"),
    pytest.param(f"0::{DOCKER_SYSTEMD}\x00\n", Reason.MALFORMED, id="nul-in-line"),
    pytest.param(
        b"0::/docker/" + b"ab" * MAX_CGROUP_FILE_BYTES, Reason.MALFORMED, id="oversized-file"
    ),
    pytest.param(
        v1(memory=K8S_CGROUPFS_GUARANTEED, pids=SLURM_V1),
        Reason.CONFLICT,
        id="hierarchies-name-different-jobs",
    ),
    pytest.param(
        v1(memory=DOCKER_SYSTEMD, pids=f"/docker/{OTHER_CONTAINER_ID}"),
        Reason.CONFLICT,
        id="hierarchies-name-different-containers",
    ),
]


@pytest.mark.parametrize(("content", "kind", "job_id"), ATTRIBUTED_CASES)
def test_recognised_layouts_are_attributed_and_trusted(
    tmp_path: Path, content: str, kind: JobKind, job_id: str
) -> None:
    write_proc_cgroup(tmp_path, 4321, content)

    attribution = attribute_process(4321, tmp_path)

    assert (attribution.job_kind, attribution.job_id) == (kind, job_id)
    assert attribution.trusted
    assert attribution.reason is Reason.ATTRIBUTED
    assert f":{attribution.cgroup_path}" in content


@pytest.mark.parametrize(("content", "reason"), UNATTRIBUTED_CASES)
def test_unrecognised_malformed_and_ambiguous_files_are_unattributed(
    tmp_path: Path, content: str | bytes, reason: AttributionReason
) -> None:
    write_proc_cgroup(tmp_path, 4321, content)

    attribution = attribute_process(4321, tmp_path)

    assert attribution == JobAttribution.unattributed(reason, attribution.cgroup_path)
    assert not attribution.trusted


def test_unattributed_path_is_reported() -> None:
    path = f"/foo/kubepods/pod{POD_UID}"
    assert attribute_cgroup_text(v2(path)).cgroup_path == path


# --- reading the file ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "pid",
    [
        pytest.param(4321, id="never-existed"),
        pytest.param(0, id="zero"),
        pytest.param(-7, id="negative"),
    ],
)
def test_missing_process_is_unattributed(tmp_path: Path, pid: int) -> None:
    write_proc_cgroup(tmp_path, 1, v2(DOCKER_SYSTEMD))
    assert attribute_process(pid, tmp_path) == JobAttribution.unattributed(Reason.NO_SUCH_PROCESS)


def _failing_open(target: Path, error: OSError) -> Any:
    real_open = Path.open

    def open_or_fail(self: Path, *args: Any, **kwargs: Any) -> Any:
        if self == target:
            raise error
        return real_open(self, *args, **kwargs)

    return open_or_fail


@pytest.mark.parametrize(
    ("error", "reason"),
    [
        pytest.param(
            PermissionError(errno.EACCES, "denied"),
            Reason.PERMISSION_DENIED,
            id="permission-denied",
        ),
        pytest.param(
            ProcessLookupError(errno.ESRCH, "gone"),
            Reason.NO_SUCH_PROCESS,
            id="exited-while-reading",
        ),
        pytest.param(
            FileNotFoundError(errno.ENOENT, "gone"), Reason.NO_SUCH_PROCESS, id="exited-before-open"
        ),
        pytest.param(OSError(errno.EIO, "io"), Reason.UNREADABLE, id="io-error"),
    ],
)
def test_read_errors_are_unattributed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, error: OSError, reason: AttributionReason
) -> None:
    # Running as root here, so file modes cannot provoke EACCES: inject the error instead.
    cgroup_file = write_proc_cgroup(tmp_path, 4321, v2(DOCKER_SYSTEMD))
    monkeypatch.setattr(Path, "open", _failing_open(cgroup_file, error))

    assert attribute_process(4321, tmp_path) == JobAttribution.unattributed(reason)


def test_cgroup_entry_that_is_a_directory_is_unreadable(tmp_path: Path) -> None:
    (tmp_path / "4321" / "cgroup").mkdir(parents=True)
    assert attribute_process(4321, tmp_path) == JobAttribution.unattributed(Reason.UNREADABLE)


def test_processes_keep_order_and_share_one_reading_per_pid(tmp_path: Path) -> None:
    write_proc_cgroup(tmp_path, 10, v2(SLURM_V2))
    write_proc_cgroup(tmp_path, 20, v2(DOCKER_SYSTEMD))
    processes = [
        GpuProcess(gpu_index=0, pid=10, used_memory_mib=100),
        GpuProcess(gpu_index=1, pid=20, used_memory_mib=200),
        GpuProcess(gpu_index=1, pid=10, used_memory_mib=300),
        GpuProcess(gpu_index=2, pid=30),
    ]

    attributed = attribute_processes(processes, tmp_path)

    assert [item.process for item in attributed] == processes
    assert [item.attribution.job_kind for item in attributed] == [
        JobKind.SLURM_JOB,
        JobKind.CONTAINER,
        JobKind.SLURM_JOB,
        JobKind.UNATTRIBUTED,
    ]
    assert attributed[0].attribution is attributed[2].attribution
    assert attributed[3].attribution.reason is Reason.NO_SUCH_PROCESS


def test_job_kinds_are_the_wire_strings() -> None:
    assert {kind.value for kind in JobKind} == {
        "kubernetes_pod",
        "slurm_job",
        "systemd_unit",
        "container",
        "unattributed",
    }


@pytest.mark.parametrize(
    "fields",
    [
        pytest.param(
            (JobKind.UNATTRIBUTED, "", "/", True, Reason.CGROUP_NAMESPACE),
            id="trusted-unattributed",
        ),
        pytest.param(
            (JobKind.CONTAINER, CONTAINER_ID, "/", False, Reason.ATTRIBUTED), id="untrusted-job"
        ),
        pytest.param((JobKind.CONTAINER, "", "/", True, Reason.ATTRIBUTED), id="job-without-id"),
        pytest.param(
            (JobKind.UNATTRIBUTED, "x", "/", False, Reason.MALFORMED), id="unattributed-with-id"
        ),
        pytest.param(
            (JobKind.CONTAINER, CONTAINER_ID, "/", True, Reason.MALFORMED),
            id="job-with-failure-reason",
        ),
        pytest.param(
            (JobKind.UNATTRIBUTED, "", "/", False, Reason.ATTRIBUTED),
            id="unattributed-with-success-reason",
        ),
    ],
)
def test_inconsistent_attribution_is_refused(
    fields: tuple[JobKind, str, str, bool, AttributionReason],
) -> None:
    with pytest.raises(ValueError, match="inconsistent"):
        JobAttribution(*fields)


# --- properties ---------------------------------------------------------------------------

# Names that matter to some layout, mixed with arbitrary text, so generated paths often come
# close to (or spoof) a real layout.
LAYOUT_WORDS = [
    "kubepods",
    "kubepods.slice",
    "kubepods-burstable.slice",
    f"kubepods-burstable-pod{POD_UID_ESCAPED}.slice",
    f"kubepods-pod{POD_UID_ESCAPED}.slice",
    "burstable",
    f"pod{POD_UID}",
    CONTAINER_ID,
    f"cri-containerd-{CONTAINER_ID}.scope",
    f"docker-{CONTAINER_ID}.scope",
    f"libpod-{CONTAINER_ID}.scope",
    "docker",
    "libpod_parent",
    "system.slice",
    "system-x.slice",
    "machine.slice",
    "user.slice",
    "user-1000.slice",
    "user@1000.service",
    "session-3.scope",
    "containerd.service",
    "slurmstepd.scope",
    "slurm",
    "uid_1000",
    "job_12",
    "step_0",
    "a.service",
    "..",
    ".",
    "",
]
words = st.one_of(st.sampled_from(LAYOUT_WORDS), st.text(max_size=12))
cgroup_paths = st.lists(words, max_size=7).map(lambda parts: "/" + "/".join(parts))
line_prefixes = st.sampled_from(
    ["0::", "11:memory:", "9:pids:", "4:cpu,cpuacct:", "1:name=systemd:", "0:memory:", "", "x:"]
)
cgroup_lines = st.one_of(st.builds(str.__add__, line_prefixes, cgroup_paths), st.text())
cgroup_texts = st.lists(cgroup_lines, max_size=5).map("\n".join)

# Independent of the module's patterns: the first component of any path that may be trusted.
ANCHOR = re.compile(
    r"kubepods(\.slice)?|docker|libpod_parent|slurm(_[^/]*)?|[^/]*\.(slice|service|scope)"
)
DELEGATED_USER_MANAGER = re.compile(r"user@[0-9]+\.service")


def _paths_in(text: str) -> list[str]:
    return [line.split(":", 2)[2] for line in text.split("\n") if line.count(":") >= 2]


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(cgroup_texts)
def test_arbitrary_text_is_trusted_only_on_an_anchored_path(text: str) -> None:
    attribution = attribute_cgroup_text(text)

    if not attribution.trusted:
        return
    path = attribution.cgroup_path
    components = path.split("/")[1:]
    assert path in _paths_in(text)
    assert ANCHOR.fullmatch(components[0])
    assert ".." not in components
    assert attribution.job_id.replace("-", "_") in path.replace("-", "_")
    manager_at = next(
        (i for i, c in enumerate(components) if DELEGATED_USER_MANAGER.fullmatch(c)), None
    )
    job_id = attribution.job_id.replace("-", "_")
    job_at = next(i for i, c in enumerate(components) if job_id in c.replace("-", "_"))
    # Below a user manager the user may create anything: the job can only be the manager
    # itself, or a job named above it (a manager inside a pod's own subtree is the pod's).
    if manager_at is not None and manager_at <= job_at:
        assert (attribution.job_kind, attribution.job_id) == (
            JobKind.SYSTEMD_UNIT,
            components[manager_at],
        )


@settings(max_examples=100, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(content=st.binary(max_size=512))
def test_arbitrary_bytes_in_the_file_never_raise(tmp_path: Path, content: bytes) -> None:
    write_proc_cgroup(tmp_path, 4321, content)

    attribution = attribute_process(4321, tmp_path)

    assert attribution.trusted == (attribution.job_kind is not JobKind.UNATTRIBUTED)


workload_suffixes = st.lists(
    words.filter(lambda word: word not in ("", ".", "..") and "/" not in word), max_size=5
)


@settings(max_examples=300)
@given(workload=st.sampled_from(sorted(WORKLOAD_PATHS)), suffix=workload_suffixes)
def test_groups_a_workload_creates_below_itself_never_change_its_job(
    workload: str, suffix: list[str]
) -> None:
    # A process can only create and enter groups below its own: whatever it names them,
    # it must stay attributed to the job it was placed in.
    path = "/".join([workload, *suffix])

    attribution = attribute_cgroup_path(path)

    assert (attribution.job_kind, attribution.job_id) == WORKLOAD_PATHS[workload]
    assert attribution.trusted


@given(prefix=cgroup_paths, suffix=cgroup_paths)
def test_a_parent_reference_is_never_trusted(prefix: str, suffix: str) -> None:
    assert not attribute_cgroup_path(f"{prefix.rstrip('/')}/..{suffix}").trusted
