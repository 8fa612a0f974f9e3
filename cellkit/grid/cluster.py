"""Where a grid's runs execute: a Dask distributed cluster (local processes, a running scheduler, SLURM).

``cellkit ablate --cluster SPEC`` (and notebook 03's ``cluster`` parameter) takes one of::

    local            a LocalCluster on this machine: one worker process per GPU (1 without GPUs)
    local:N          the same with N worker processes (GPUs assigned round-robin)
    tcp://HOST:PORT  the scheduler of a running cluster (``dask scheduler`` + ``dask worker``)
    slurm[:N]        a dask-jobqueue SLURMCluster of N jobs (default 1), configured in
                     ~/.config/dask/jobqueue.yaml; needs ``pip install 'cellkit[slurm]'``

Every worker runs one task (one run of a grid) at a time. A local worker gets its own
``CUDA_VISIBLE_DEVICES`` and the resource ``GPU=1`` when there are GPUs; workers started by hand
advertise theirs with ``dask worker ... --resources GPU=1``, and when any worker of a cluster has a
``GPU`` resource every task asks for one, so one GPU runs one training at a time.
"""
from __future__ import annotations

import contextlib
import inspect
import logging
import os
import re
import socket
import sys
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import dask
from distributed import Client, LocalCluster, Nanny, Scheduler, SpecCluster

from ..errors import CellkitError, ConfigError

__all__ = ["Cluster", "ClusterSpec", "cpu_count", "gpu_driver_loaded", "open_cluster", "parse_cluster",
           "threads_per_worker", "visible_gpus"]

FORMS = "local, local:N, tcp://HOST:PORT (a running dask scheduler) or slurm[:N]"


@dataclass(frozen=True)
class ClusterSpec:
    """A parsed ``--cluster`` value."""

    kind: str
    """``local``, ``address`` or ``slurm``."""
    workers: int | None = None
    """Worker processes (local) or jobs (slurm); None: the default (one per GPU, else 1)."""
    address: str | None = None
    """The scheduler address (``address`` only)."""

    def __str__(self) -> str:
        if self.kind == "address":
            return str(self.address)
        return self.kind + (f":{self.workers}" if self.workers is not None else "")


def parse_cluster(spec: "str | ClusterSpec | None") -> ClusterSpec:
    """Parse ``local``, ``local:N``, ``tcp://HOST:PORT`` (any dask scheme: tls://, ucx://, ...) or ``slurm[:N]``.

    Raises:
        ConfigError: anything else, naming the accepted forms.
    """
    if isinstance(spec, ClusterSpec):
        return spec
    text = (spec or "local").strip()
    m = re.fullmatch(r"(local|slurm)(?::(\d+))?", text)
    if m:
        n = int(m.group(2)) if m.group(2) is not None else None
        if n is not None and n < 1:
            raise ConfigError(f"cluster {text!r}: the number of workers must be at least 1")
        return ClusterSpec(m.group(1), n)
    m = re.fullmatch(r"([a-z][a-z0-9+]*)://([^\s/:]+|\[[0-9a-fA-F:]+\]):(\d+)/?", text)
    if m:
        return ClusterSpec("address", address=text.rstrip("/"))
    raise ConfigError(f"cluster {text!r}: expected {FORMS}")


@dataclass
class Cluster:
    """An open cluster: its client and what the grid runner needs to know about its workers."""

    client: Any
    """The ``distributed.Client``."""
    spec: ClusterSpec
    description: str
    """One line for the log: what runs where."""
    gpu_resources: bool = False
    """Some worker advertises a ``GPU`` resource: every task asks for ``GPU=1``."""
    threads: dict[str, int] = field(default_factory=dict)
    """Worker address -> CPU threads a run on it may use (the host's cores split between its workers)."""

    def threads_for(self, address: str | None) -> int:
        """CPU threads for a run on worker ``address`` (``OMP_NUM_THREADS`` of the runner if set)."""
        if os.environ.get("OMP_NUM_THREADS", "").isdigit():
            return max(1, int(os.environ["OMP_NUM_THREADS"]))
        return self.threads.get(address or "", 0) or max(1, cpu_count())


@contextlib.contextmanager
def open_cluster(spec: "str | ClusterSpec | None", gpus: Sequence[int | str] | None = None,
                 retries: int = 2) -> Iterator[Cluster]:
    """Start (local, slurm) or connect to (address) a cluster; close what was started on exit.

    Args:
        spec: see :func:`parse_cluster`.
        gpus: GPU ids a local cluster spreads its workers over (default: the visible CUDA devices).
        retries: how often the scheduler of a local cluster reschedules a task whose worker died
            (``distributed.scheduler.allowed-failures``); a remote scheduler keeps its own setting.

    Raises:
        ConfigError: a malformed spec, a scheduler that does not answer, slurm without dask-jobqueue.
    """
    cs = parse_cluster(spec)
    logging.getLogger("distributed").setLevel(logging.WARNING)  # keep worker restarts, drop the chatter
    with dask.config.set({"distributed.scheduler.allowed-failures": int(retries)}):
        if cs.kind == "local":
            try:
                with _keep_thread_env():
                    cluster, desc = _local_cluster(cs.workers, gpus)
            except RuntimeError as e:  # a worker process could not start
                raise CellkitError(
                    f"the local cluster's worker processes did not start ({e}). They are spawned and import "
                    "the main script again: a script that calls run_grid must do so under "
                    "`if __name__ == \"__main__\":`") from e
        elif cs.kind == "slurm":
            cluster, desc = _slurm_cluster(cs.workers)
        else:
            cluster, desc = None, f"scheduler {cs.address}"
        try:
            if cluster is not None:
                client = Client(cluster)
            else:
                try:
                    _probe(cs.address)
                    client = Client(cs.address, timeout="30s")
                except (OSError, TimeoutError) as e:
                    raise ConfigError(f"cluster {cs.address}: no dask scheduler answers there ({e}); start one with "
                                      "`dask scheduler` and workers with `dask worker ADDRESS`") from None
        except BaseException:
            if cluster is not None:
                cluster.close()
            raise
    try:
        if cs.kind == "slurm":
            client.wait_for_workers(1)
        info = client.scheduler_info(n_workers=-1)["workers"] if _takes_n_workers(client) else \
            client.scheduler_info()["workers"]
        gpu_resources = any("GPU" in (w.get("resources") or {}) for w in info.values())
        yield Cluster(client, cs, f"{desc}; {len(info)} workers", gpu_resources, threads_per_worker(client, info))
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


@contextlib.contextmanager
def _keep_thread_env() -> Iterator[None]:
    """Undo what starting a LocalCluster does to this process's environment: its nannies set
    ``OMP_NUM_THREADS=1`` (and MKL/OpenBLAS) here for their workers (dask's
    ``distributed.nanny.pre-spawn-environ``), which :meth:`Cluster.threads_for` would then read as
    the user's choice, giving every run of a local grid one thread."""
    saved = {k: os.environ.get(k) for k in THREAD_VARS}
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _probe(address: str) -> None:
    """Fail at once (OSError) when nothing listens at a ``tcp://`` address (dask would retry for its
    whole connect timeout)."""
    scheme, _, rest = address.partition("://")
    if scheme != "tcp":
        return
    host, _, port = rest.rstrip("/").rpartition(":")
    with socket.create_connection((host.strip("[]"), int(port)), timeout=10):
        pass


def _local_cluster(n: int | None, gpus: Sequence[int | str] | None) -> tuple[Any, str]:
    """A LocalCluster of worker processes on 127.0.0.1, one task at a time each; with GPUs each worker
    gets one ``CUDA_VISIBLE_DEVICES`` and the resource ``GPU=1``."""
    gpu_ids = visible_gpus() if gpus is None else [str(g) for g in gpus]
    n = n or max(1, len(gpu_ids))
    common = {"nthreads": 1, "memory_limit": 0, "host": "127.0.0.1"}
    if not gpu_ids:
        cluster = LocalCluster(n_workers=n, threads_per_worker=1, processes=True, host="127.0.0.1",
                               dashboard_address=None, memory_limit=0)
        return cluster, f"local cluster: {n} worker processes (CPU)"
    workers = {i: {"cls": Nanny, "options": {**common, "resources": {"GPU": 1},
                                             "env": {"CUDA_VISIBLE_DEVICES": gpu_ids[i % len(gpu_ids)]}}}
               for i in range(n)}
    scheduler = {"cls": Scheduler, "options": {"host": "127.0.0.1", "dashboard_address": None}}
    cluster = SpecCluster(workers=workers, scheduler=scheduler, name="cellkit-grid")
    return cluster, f"local cluster: {n} worker processes on GPUs {', '.join(gpu_ids)}"


def _slurm_cluster(jobs: int | None) -> tuple[Any, str]:
    try:
        from dask_jobqueue import SLURMCluster
    except ImportError:
        raise ConfigError("--cluster slurm needs dask-jobqueue: pip install 'cellkit[slurm]' "
                          "(or pip install dask-jobqueue)") from None
    try:
        cluster = SLURMCluster()
    except ValueError as e:  # cores / memory not configured
        raise ConfigError(f"--cluster slurm: {e} (set jobqueue.slurm cores, memory, and for GPUs "
                          "job_extra_directives: ['--gres=gpu:1'] and worker_extra_args: ['--resources', 'GPU=1'] "
                          "in ~/.config/dask/jobqueue.yaml)") from None
    cluster.scale(jobs=jobs or 1)
    return cluster, f"SLURM cluster: {jobs or 1} jobs"


def _takes_n_workers(client: Any) -> bool:
    return "n_workers" in inspect.signature(client.scheduler_info).parameters


def threads_per_worker(client: Any, info: dict[str, Any]) -> dict[str, int]:
    """Each worker's share of its host's CPU cores (the cores over the workers on that host)."""
    try:
        cores = client.run(cpu_count)
    except Exception:  # a worker went away meanwhile: fall back to the task's own count
        return {}
    per_host: dict[str, int] = {}
    for w in info.values():
        per_host[w.get("host", "")] = per_host.get(w.get("host", ""), 0) + 1
    return {addr: max(1, cores.get(addr, cpu_count()) // max(1, per_host.get(w.get("host", ""), 1)))
            for addr, w in info.items()}


def cpu_count() -> int:
    """CPU cores this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


GPU_DRIVER_PATHS = ("/proc/driver/nvidia/gpus", "/dev/kfd")
"""What a Linux machine shows when it has a CUDA (NVIDIA) or ROCm (AMD) GPU driver loaded."""


def gpu_driver_loaded() -> bool:
    """Whether torch could see a GPU here: on Linux, one of :data:`GPU_DRIVER_PATHS` exists;
    elsewhere, assumed so (torch is asked)."""
    return not sys.platform.startswith("linux") or any(os.path.exists(p) for p in GPU_DRIVER_PATHS)


def visible_gpus() -> list[str]:
    """Ids of the CUDA devices this process may use (as ``CUDA_VISIBLE_DEVICES`` entries)."""
    # torch is imported here only, and only where a driver could show it a GPU: the grid's own
    # processes (the runner, its Dask workers, each run's papermill worker) hold no torch; the
    # kernel each run starts does the training. Importing it cost each such process 1.7 s of CPU
    # time and 750 MB of resident memory (docs/architecture.md)
    if not gpu_driver_loaded():
        return []
    import torch

    try:
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:  # pragma: no cover - a broken CUDA install counts as none
        count = 0
    if not count:
        return []
    listed = [x.strip() for x in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if x.strip()]
    return listed[:count] if listed else [str(i) for i in range(count)]
