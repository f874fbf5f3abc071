"""Attribute GPU processes to the job that owns them, from ``/proc/<pid>/cgroup``.

Every process sits in a control group, and the orchestrators name their groups after their
jobs: kubelet creates one group per pod, Slurm one per job, a container runtime one per
container, systemd one per unit. Reading a process's group therefore tells which job it
belongs to, *provided the workload could not have chosen that group itself*.

Trust model
-----------
A process may create child groups below the group it is in, and move itself into them,
whenever that subtree is delegated to it: a rootless container engine or a user's own
``systemd --user`` manager below ``/user.slice/user-<uid>.slice/user@<uid>.service``, or a
container given a writable cgroup namespace below its scope. It can never create a sibling
or an ancestor of its group, nor move into a group outside its subtree. So a
job-identifying name is only evidence when it sits where the orchestrator's own, root-run
manager creates it, counted from the cgroup root:

- kubelet: ``/kubepods.slice/[kubepods-<qos>.slice/]kubepods-[<qos>-]pod<uid>.slice`` (systemd
  driver; dashes of the UID escaped as underscores) or ``/kubepods/[<qos>/]pod<uid>``
  (cgroupfs driver). The UID is a UUID, or 32 hex digits for static pods.
- Slurm: ``/system.slice/[<node>_]slurmstepd.scope/job_<id>`` (cgroup/v2 plugin; the scope
  may sit in any slice) or ``/slurm[_<node>]/uid_<uid>/job_<id>`` (cgroup/v1 plugin).
- container runtimes: a ``docker-``, ``cri-containerd-``, ``crio-`` or ``libpod-<64 hex>.scope``
  unit, ``/docker/<64 hex>``, ``/libpod_parent/libpod-<64 hex>``, or the first group below
  ``containerd.service``.
- systemd: the first unit (``.service`` or ``.scope``) reached from the root through a chain
  of properly nested slices (``a.slice/a-b.slice/...``): ``/system.slice/sshd.service``,
  ``/user.slice/user-1000.slice/session-3.scope``, ``.../user@1000.service``.

Only the job-identifying component and the components above it are read; everything
below it is ignored, because that is exactly the part a workload may have created. Hence
a delegated subtree never yields a more specific job than its owner: a path through
``user@1000.service/app.slice/kubepods-pod<uid>.slice`` is the systemd unit
``user@1000.service`` (trusted, since systemd put the process there), and
``/system.slice/docker-<id>.scope/kubepods/pod<uid>`` is the container ``<id>``. A user
session scope is reported as the systemd unit ``session-<n>.scope`` (created by logind via
PID 1, never delegated); the user's own manager as ``user@<uid>.service``. A path that
matches none of the anchored forms is ``unattributed``. Consequently this module never
emits an untrusted attribution: ``trusted`` is true exactly when ``job_kind`` is not
``unattributed``, and :class:`JobAttribution` enforces that.

Reading the file
----------------
cgroup v2 shows one line ``0::/path``. cgroup v1 (and hybrid) shows one line per hierarchy,
``<id>:<controllers>:/path``; the unified line and the lines of the ``pids``, ``memory``,
``cpu``/``cpuacct``, ``devices`` and ``freezer`` controllers are read, in that preference.
Named hierarchies (``name=systemd``) are ignored. Lines legitimately disagree under v1
(Slurm's cgroup/v1 plugin moves tasks in ``memory`` and ``freezer`` only, while systemd keeps
them in ``slurmd.service`` elsewhere), so the most specific trusted attribution wins
(pod or Slurm job, then container, then systemd unit); two different jobs at the same
level are a conflict and give ``unattributed``.

The path is shown relative to the *reader's* cgroup namespace. Read from inside a private
namespace, a group outside it shows as ``/../../...`` and the namespace root as ``/``; the
absolute position is then unknown, so both give ``unattributed``. The agent must run in the
host cgroup namespace (a systemd unit does; a Kubernetes DaemonSet on cgroup v2 does not
by default). Residual limits: a process inside the reader's own namespace subtree shows
a plausible absolute path (only the agent's own descendants can be there), and a pid can
be reused between NVML listing it and this module reading its group.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from agent.samples import GpuProcess


class JobKind(StrEnum):
    """What kind of job owns a process; the values are the wire strings."""

    KUBERNETES_POD = "kubernetes_pod"
    SLURM_JOB = "slurm_job"
    SYSTEMD_UNIT = "systemd_unit"
    CONTAINER = "container"
    UNATTRIBUTED = "unattributed"


class AttributionReason(StrEnum):
    """Why an attribution came out as it did (for operators; not on the wire)."""

    ATTRIBUTED = "attributed"
    NO_SUCH_PROCESS = "no_such_process"  # pid gone, never existed, or hidden from us
    PERMISSION_DENIED = "permission_denied"
    UNREADABLE = "unreadable"  # any other I/O failure
    MALFORMED = "malformed"  # no usable hierarchy line, or a path that cannot be real
    CGROUP_NAMESPACE = "cgroup_namespace"  # "/" or "/..": position unknown to the reader
    UNRECOGNISED = "unrecognised"  # a well-formed path in no anchored layout
    CONFLICT = "conflict"  # hierarchies name different jobs


@dataclass(frozen=True)
class JobAttribution:
    """The job a process belongs to, and the cgroup path that says so.

    ``job_id`` is the pod UID (with dashes), Slurm job id, unit name or container id, and ""
    when unattributed. ``cgroup_path`` is the path the decision was read from ("" when no
    single line decided). ``trusted`` is true exactly when a job was attributed.
    """

    job_kind: JobKind
    job_id: str
    cgroup_path: str
    trusted: bool
    reason: AttributionReason

    def __post_init__(self) -> None:
        attributed = self.job_kind is not JobKind.UNATTRIBUTED
        if self.trusted != attributed or bool(self.job_id) != attributed:
            raise ValueError(f"inconsistent attribution: {self!r}")
        if attributed != (self.reason is AttributionReason.ATTRIBUTED):
            raise ValueError(f"inconsistent attribution reason: {self!r}")

    @classmethod
    def unattributed(cls, reason: AttributionReason, cgroup_path: str = "") -> JobAttribution:
        """An untrusted "no job" result, with the reason."""
        return cls(JobKind.UNATTRIBUTED, "", cgroup_path, False, reason)

    @classmethod
    def attributed(cls, job_kind: JobKind, job_id: str, cgroup_path: str) -> JobAttribution:
        """A trusted job read from ``cgroup_path``."""
        return cls(job_kind, job_id, cgroup_path, True, AttributionReason.ATTRIBUTED)


@dataclass(frozen=True)
class AttributedGpuProcess:
    """A GPU process together with the job it was attributed to."""

    process: GpuProcess
    attribution: JobAttribution


# A real /proc/<pid>/cgroup holds about 15 lines of at most PATH_MAX each; a larger file is
# refused rather than truncated, since a cut path could name a different group.
MAX_CGROUP_FILE_BYTES = 64 * 1024

_HEX64 = "[0-9a-f]{64}"
# Pod UIDs are UUIDs; static pods use 32 hex digits (an MD5 of the manifest).
_UUID_GROUPS = ("[0-9a-f]{8}", "[0-9a-f]{4}", "[0-9a-f]{4}", "[0-9a-f]{4}", "[0-9a-f]{12}")
_UUID = "-".join(_UUID_GROUPS)
_UUID_UNDERSCORED = "_".join(_UUID_GROUPS)  # systemd slice names reserve "-" for nesting
_STATIC_POD_UID = "[0-9a-f]{32}"
_JOB_NUMBER = "[0-9]{1,10}"
# Below the job component anything may follow: it is the workload's to name.
_ANYTHING_BELOW = "(?:/.*)?"


@dataclass(frozen=True)
class _AnchoredLayout:
    """One orchestrator's layout: a pattern anchored at the cgroup root naming the job."""

    job_kind: JobKind
    pattern: re.Pattern[str]  # group "id" is the job id as written in the path
    normalise_id: Callable[[str], str] = str


def _dashed(uid: str) -> str:
    return uid.replace("_", "-")


_ANCHORED_LAYOUTS = (
    _AnchoredLayout(
        JobKind.KUBERNETES_POD,
        re.compile(
            r"/kubepods\.slice/(?:kubepods-(?P<qos>burstable|besteffort)\.slice/"
            rf"kubepods-(?P=qos)-|kubepods-)pod(?P<id>{_UUID_UNDERSCORED}|{_STATIC_POD_UID})"
            rf"\.slice{_ANYTHING_BELOW}",
            re.ASCII | re.DOTALL,
        ),
        _dashed,
    ),
    _AnchoredLayout(
        JobKind.KUBERNETES_POD,
        re.compile(
            rf"/kubepods/(?:(?:burstable|besteffort)/)?pod(?P<id>{_UUID}|{_STATIC_POD_UID})"
            rf"{_ANYTHING_BELOW}",
            re.ASCII | re.DOTALL,
        ),
    ),
    _AnchoredLayout(
        JobKind.SLURM_JOB,
        re.compile(
            rf"/slurm(?:_[^/]+)?/uid_[0-9]+/job_(?P<id>{_JOB_NUMBER}){_ANYTHING_BELOW}",
            re.ASCII | re.DOTALL,
        ),
    ),
    _AnchoredLayout(
        JobKind.CONTAINER,
        re.compile(rf"/docker/(?P<id>{_HEX64}){_ANYTHING_BELOW}", re.ASCII | re.DOTALL),
    ),
    _AnchoredLayout(
        JobKind.CONTAINER,
        re.compile(
            rf"/libpod_parent/libpod-(?P<id>{_HEX64}){_ANYTHING_BELOW}", re.ASCII | re.DOTALL
        ),
    ),
)

# systemd names: letters, digits, ":-_.\" (escapes look like "\x2d"), "@" in instances.
_SLICE = re.compile(r"(?P<stem>[A-Za-z0-9:_.\\-]+)\.slice", re.ASCII)
_UNIT = re.compile(r"[A-Za-z0-9:_.\\@-]+\.(?:service|scope)", re.ASCII)
_CONTAINER_SCOPE = re.compile(
    rf"(?:docker|cri-containerd|crio|libpod)-(?P<id>{_HEX64})\.scope", re.ASCII
)
_SLURMSTEPD_SCOPE = re.compile(r"(?:[A-Za-z0-9:_.\\@-]+_)?slurmstepd\.scope", re.ASCII)
_SLURM_JOB_DIR = re.compile(rf"job_(?P<id>{_JOB_NUMBER})", re.ASCII)
# containerd names a container's group after its id; when kubelet asked for a systemd-style
# cgroupsPath ("<slice>:<prefix>:<id>") but containerd runs cgroupfs, that string is the name.
_CONTAINERD_CHILD = re.compile(
    r"(?:[^:]+:[^:]+:)?(?P<id>[A-Za-z0-9][A-Za-z0-9_.-]{0,127})", re.ASCII
)

_HIERARCHY_ID = re.compile(r"[0-9]{1,10}", re.ASCII)
# Lower is preferred: the unified hierarchy, then v1 controllers that jobs are placed in.
_UNIFIED_PREFERENCE = 0
_CONTROLLER_PREFERENCE = {
    "pids": 1,
    "memory": 2,
    "cpu": 3,
    "cpuacct": 3,
    "devices": 4,
    "freezer": 5,
}
# More specific jobs win over the units and containers that host them.
_SPECIFICITY = {
    JobKind.KUBERNETES_POD: 3,
    JobKind.SLURM_JOB: 3,
    JobKind.CONTAINER: 2,
    JobKind.SYSTEMD_UNIT: 1,
    JobKind.UNATTRIBUTED: 0,
}


def attribute_process(pid: int, proc_root: Path) -> JobAttribution:
    """Attribute process ``pid`` to its job by reading ``<proc_root>/<pid>/cgroup``.

    Never raises for a missing, unreadable or malformed file: those give an untrusted
    ``unattributed`` result whose ``reason`` says why.
    """
    if pid < 1:
        return JobAttribution.unattributed(AttributionReason.NO_SUCH_PROCESS)
    try:
        raw = _read_bounded(proc_root / str(pid) / "cgroup")
    except (FileNotFoundError, ProcessLookupError):
        return JobAttribution.unattributed(AttributionReason.NO_SUCH_PROCESS)
    except PermissionError:
        return JobAttribution.unattributed(AttributionReason.PERMISSION_DENIED)
    except OSError:
        return JobAttribution.unattributed(AttributionReason.UNREADABLE)
    if raw is None:
        return JobAttribution.unattributed(AttributionReason.MALFORMED)
    return attribute_cgroup_text(raw.decode("utf-8", errors="replace"))


def attribute_processes(
    processes: Iterable[GpuProcess], proc_root: Path
) -> list[AttributedGpuProcess]:
    """Attribute each GPU process, in order; a pid on several GPUs is read once."""
    by_pid: dict[int, JobAttribution] = {}
    attributed = []
    for process in processes:
        if process.pid not in by_pid:
            by_pid[process.pid] = attribute_process(process.pid, proc_root)
        attributed.append(AttributedGpuProcess(process, by_pid[process.pid]))
    return attributed


def attribute_cgroup_text(text: str) -> JobAttribution:
    """Attribute the contents of one ``/proc/<pid>/cgroup`` file (see the module doc)."""
    candidates = [
        (preference, attribute_cgroup_path(path))
        for preference, path in sorted(_hierarchy_paths(text), key=lambda pair: pair[0])
    ]
    if not candidates:
        return JobAttribution.unattributed(AttributionReason.MALFORMED)
    trusted = [attribution for _, attribution in candidates if attribution.trusted]
    if not trusted:
        return candidates[0][1]
    top = max(_SPECIFICITY[attribution.job_kind] for attribution in trusted)
    best = [attribution for attribution in trusted if _SPECIFICITY[attribution.job_kind] == top]
    if len({(attribution.job_kind, attribution.job_id) for attribution in best}) > 1:
        return JobAttribution.unattributed(AttributionReason.CONFLICT)
    return best[0]


def attribute_cgroup_path(path: str) -> JobAttribution:
    """Attribute one cgroup path as shown in ``/proc/<pid>/cgroup`` (see the module doc)."""
    if not path.startswith("/"):
        return JobAttribution.unattributed(AttributionReason.MALFORMED, path)
    components = path[1:].split("/")
    if path == "/" or ".." in components:
        return JobAttribution.unattributed(AttributionReason.CGROUP_NAMESPACE, path)
    if "" in components or "." in components:
        return JobAttribution.unattributed(AttributionReason.MALFORMED, path)
    for layout in _ANCHORED_LAYOUTS:
        match = layout.pattern.fullmatch(path)
        if match:
            return JobAttribution.attributed(
                layout.job_kind, layout.normalise_id(match["id"]), path
            )
    found = _systemd_unit_job(components)
    if found is None:
        return JobAttribution.unattributed(AttributionReason.UNRECOGNISED, path)
    job_kind, job_id = found
    return JobAttribution.attributed(job_kind, job_id, path)


def _read_bounded(path: Path) -> bytes | None:
    """The file's bytes, or None when it is larger than any real cgroup file."""
    with path.open("rb") as file:
        raw = file.read(MAX_CGROUP_FILE_BYTES + 1)
    return None if len(raw) > MAX_CGROUP_FILE_BYTES else raw


def _hierarchy_paths(text: str) -> Iterator[tuple[int, str]]:
    """(preference, path) of each line worth reading; other lines are skipped."""
    for line in text.split("\n"):
        fields = line.split(":", 2)
        if len(fields) != 3 or "\x00" in line:
            continue
        hierarchy_id, controllers, path = fields
        if not _HIERARCHY_ID.fullmatch(hierarchy_id):
            continue
        preference = _hierarchy_preference(int(hierarchy_id), controllers)
        if preference is not None:
            yield preference, path


def _hierarchy_preference(hierarchy_id: int, controllers: str) -> int | None:
    if hierarchy_id == 0:
        # The unified hierarchy never lists controllers on this line.
        return _UNIFIED_PREFERENCE if controllers == "" else None
    preferences = [_CONTROLLER_PREFERENCE.get(name) for name in controllers.split(",")]
    known = [preference for preference in preferences if preference is not None]
    return min(known) if known else None


def _systemd_unit_job(components: list[str]) -> tuple[JobKind, str] | None:
    """The job named by the first unit below a chain of nested slices from the root.

    systemd (PID 1) creates every slice and unit group on that chain; the first group below
    the unit is created by the unit's own root-run manager (slurmstepd, containerd); anything
    deeper may be the workload's and is not read.
    """
    parent_stem = ""
    for depth, component in enumerate(components):
        slice_match = _SLICE.fullmatch(component)
        if slice_match:
            if not _nests_under(slice_match["stem"], parent_stem):
                return None
            parent_stem = slice_match["stem"]
            continue
        if not _UNIT.fullmatch(component):
            return None
        child = components[depth + 1] if depth + 1 < len(components) else None
        return _unit_job(component, child)
    return None  # slices hold no processes of their own


def _nests_under(stem: str, parent_stem: str) -> bool:
    """Whether systemd would place slice ``<stem>.slice`` inside ``<parent_stem>.slice``."""
    prefix = f"{parent_stem}-" if parent_stem else ""
    if not stem.startswith(prefix):
        return False
    own_part = stem[len(prefix) :]
    return own_part != "" and "-" not in own_part


def _unit_job(unit: str, child: str | None) -> tuple[JobKind, str]:
    container = _CONTAINER_SCOPE.fullmatch(unit)
    if container:
        return JobKind.CONTAINER, container["id"]
    if child is not None and _SLURMSTEPD_SCOPE.fullmatch(unit):
        slurm_job = _SLURM_JOB_DIR.fullmatch(child)
        if slurm_job:
            return JobKind.SLURM_JOB, slurm_job["id"]
    if child is not None and unit == "containerd.service":
        containerd_child = _CONTAINERD_CHILD.fullmatch(child)
        if containerd_child:
            return JobKind.CONTAINER, containerd_child["id"]
    return JobKind.SYSTEMD_UNIT, unit
