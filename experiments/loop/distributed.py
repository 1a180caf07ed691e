"""Training on several processes with JAX's multi-controller runtime (:mod:`jax.distributed`).

Every process runs the same program: ``--coordinator HOST:PORT --num-processes N
--process-id I``; no flag under SLURM's ``srun``, Open MPI's ``mpirun`` or on a Cloud TPU
pod on GKE, whose settings :func:`jax.distributed.initialize` reads itself; and
``--coordinator auto`` for the other clusters it knows (Cloud TPU VMs on GCE, Kubernetes
with the ``kubernetes`` package, ``mpi4py``); see :func:`setup_processes`. The mesh spans
the devices of all processes and ``--batch-size`` stays the global minibatch: every process
builds the same shuffled global batches (the order depends on the seed alone, so no
communication is needed) and hands its devices only its own rows
(:func:`put_global_batches`, with :func:`jax.make_array_from_process_local_data`). Losses and
accuracies are sums over the global batch, hence equal on every process; only process 0
writes logs, ``results.json``, plots and the progress bar, and orbax writes the checkpoints as
one multi-process save (process 0 writes the replicated arrays and the metadata; a save is
renamed into place only once complete, so a crash leaves no checkpoint that looks whole).

Failure is bounded: a process that cannot reach the coordinator gives up after
``--init-timeout`` seconds, and when a process dies the others abort (a non-zero exit)
within about ``--heartbeat-timeout`` seconds.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from experiments.common import ConfigError, require
from experiments.common.cli import flag_group
from experiments.loop.signals import StopFlag
from experiments.loop.task import Batch

__all__ = [
    "AUTO",
    "DEFAULT_HEARTBEAT_TIMEOUT_S",
    "DEFAULT_INIT_TIMEOUT_S",
    "add_distributed_arguments",
    "barrier",
    "check_all_devices",
    "cluster_processes",
    "is_main_process",
    "main_process_only",
    "put_global_batches",
    "setup_processes",
    "stop_flag",
]

#: Seconds to wait for every process to reach the coordinator (and for all to shut down).
DEFAULT_INIT_TIMEOUT_S = 300
#: Seconds of silence after which a process counts as dead and the others abort.
DEFAULT_HEARTBEAT_TIMEOUT_S = 100
#: ``--coordinator auto``: let :func:`jax.distributed.initialize` find every setting itself.
AUTO = "auto"


def cluster_processes(env: dict[str, str] | None = None) -> int:
    """The number of processes a launcher announces in the environment (1 when none does):
    SLURM's ``srun`` (``SLURM_NTASKS``, inside a job step only, so that a batch script's own
    shell stays one process), Open MPI's ``mpirun`` (``OMPI_COMM_WORLD_SIZE``) and Cloud TPU
    pods on GKE (the hosts of ``TPU_WORKER_HOSTNAMES``). JAX reads the rest of the setup
    from the same environment."""
    env = dict(os.environ) if env is None else env
    if "SLURM_STEP_NODELIST" in env and env.get("SLURM_NTASKS", "").isdigit():
        return int(env["SLURM_NTASKS"])
    if "OMPI_MCA_orte_hnp_uri" in env and env.get("OMPI_COMM_WORLD_SIZE", "").isdigit():
        return int(env["OMPI_COMM_WORLD_SIZE"])
    hosts = env.get("TPU_PROCESS_ADDRESSES") or env.get("TPU_WORKER_HOSTNAMES")
    if hosts:
        return len([h for h in hosts.split(",") if h.strip()])
    return 1


def add_distributed_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds ``--coordinator``, ``--num-processes``, ``--process-id`` and the timeouts."""
    g = flag_group(
        parser,
        "several processes",
        "jax.distributed; no flag is needed under srun, mpirun or on a GKE TPU pod",
    )
    g.add_argument(
        "--coordinator",
        metavar="HOST:PORT",
        default=None,
        help="address of process 0, the same for every process; 'auto' lets JAX find it and "
        "the process ids (Cloud TPU VMs, Kubernetes, mpi4py) (default: one process, or what "
        "srun, mpirun or a GKE TPU pod says)",
    )
    g.add_argument("--num-processes", type=int, default=None, help="processes in all")
    g.add_argument("--process-id", type=int, default=None, help="this process, 0..N-1")
    g.add_argument(
        "--init-timeout",
        type=int,
        default=DEFAULT_INIT_TIMEOUT_S,
        help=f"seconds to wait for every process to join (default {DEFAULT_INIT_TIMEOUT_S})",
    )
    g.add_argument(
        "--heartbeat-timeout",
        type=int,
        default=DEFAULT_HEARTBEAT_TIMEOUT_S,
        help="seconds after which a silent process counts as dead and the others stop "
        f"(default {DEFAULT_HEARTBEAT_TIMEOUT_S})",
    )


def _flags_given(args: argparse.Namespace) -> list[str]:
    names = ("coordinator", "num_processes", "process_id")
    return [f"--{n.replace('_', '-')}" for n in names if getattr(args, n, None) is not None]


def setup_processes(args: argparse.Namespace, log: Callable[[str], None] | None = None) -> int:
    """Joins the other processes of the run, before anything touches a device; returns the
    number of processes.

    With ``--coordinator``, ``--num-processes`` and ``--process-id`` (all three, or none)
    this calls :func:`jax.distributed.initialize` with them; with ``--coordinator auto``
    alone, or with no flag where a launcher announces several processes
    (:func:`cluster_processes`), it calls it without them (JAX reads the cluster's own
    settings); otherwise the run stays on one process. ``--num-processes 1`` is one process
    too. On CPU the collectives between processes go through gloo. Calling it again does
    nothing.

    Raises:
      ConfigError: some of the three flags without the others, values out of range, or a
        backend already started (the flags came too late).
    """
    if jax.distributed.is_initialized():
        return jax.process_count()
    given = _flags_given(args)
    auto = getattr(args, "coordinator", None) == AUTO
    require(
        not auto or len(given) == 1,
        "--coordinator auto takes neither --num-processes nor --process-id (JAX finds them)",
    )
    require(
        auto or not given or len(given) == 3,
        f"{' and '.join(given)} need all of --coordinator, --num-processes and --process-id",
    )
    init_timeout = getattr(args, "init_timeout", DEFAULT_INIT_TIMEOUT_S)
    heartbeat = getattr(args, "heartbeat_timeout", DEFAULT_HEARTBEAT_TIMEOUT_S)
    require(init_timeout >= 1, f"--init-timeout must be >= 1 second, got {init_timeout}")
    require(heartbeat >= 1, f"--heartbeat-timeout must be >= 1 second, got {heartbeat}")
    explicit = bool(given) and not auto
    if explicit:
        n, i = args.num_processes, args.process_id
        require(n >= 1, f"--num-processes must be >= 1, got {n}")
        require(0 <= i < n, f"--process-id must be in 0..{n - 1}, got {i}")
        host, _, port = args.coordinator.rpartition(":")
        require(
            bool(host) and port.isdigit(),
            f"--coordinator must be HOST:PORT, got {args.coordinator!r}",
        )
        if n == 1:
            return 1
        where = f"process {i} of {n}, coordinator {args.coordinator}"
    elif auto:
        where = "cluster settings found by JAX"
    elif cluster_processes() > 1:
        where = f"{cluster_processes()} processes announced by the launcher"
    else:
        return 1
    _use_cpu_collectives()
    (log or _stderr)(f"joining the other processes ({where}; waiting up to {init_timeout}s)")
    try:
        jax.distributed.initialize(
            args.coordinator if explicit else None,
            args.num_processes if explicit else None,
            args.process_id if explicit else None,
            initialization_timeout=init_timeout,
            heartbeat_timeout_seconds=heartbeat,
            shutdown_timeout_seconds=init_timeout,
        )
    except RuntimeError as exc:
        raise ConfigError(
            f"--coordinator: cannot set up several processes: {str(exc).splitlines()[0]} "
            "(start every process of the run with these flags before anything else)"
        ) from None
    return jax.process_count()


def _use_cpu_collectives() -> None:
    # CPU devices of different processes talk through gloo; GPUs and TPUs ignore this.
    if jax.config.jax_cpu_collectives_implementation in (None, "", "none"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def is_main_process() -> bool:
    """Whether this process writes the run's files (process 0, or the only one)."""
    return jax.process_index() == 0


def main_process_only(log: Callable[[str], None]) -> Callable[[str], None]:
    """``log`` on process 0, a function that drops every line on the others."""
    return log if is_main_process() else (lambda line: None)


class _AgreedStopFlag(StopFlag):
    """A :class:`StopFlag` that every process reads alike: set once any process has been
    asked to stop. Every read is a collective, so the loop reads it at the same points on
    every process (it does: at epoch and chunk boundaries), and all stop at the same chunk."""

    @property
    def requested(self) -> bool:
        from jax.experimental import multihost_utils

        mine = np.int32(self.signum is not None)
        return bool(np.max(multihost_utils.process_allgather(mine)))


def stop_flag() -> StopFlag:
    """The run's :class:`StopFlag`: on several processes, a signal to any one of them (Ctrl-C
    reaches only the one in the foreground) stops them all at the same chunk boundary."""
    return _AgreedStopFlag() if jax.process_count() > 1 else StopFlag()


def barrier(name: str) -> None:
    """Waits until every process gets here (nothing to wait for on one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def check_all_devices(requested: int | None) -> int:
    """The device count of a run on several processes: every device of every process (a
    process without a share of the batch would have nothing to do).

    Raises:
      ConfigError: ``--devices`` asks for another count.
    """
    total = jax.device_count()
    if requested is not None and requested != total:
        raise ConfigError(
            f"--devices {requested}: a run on {jax.process_count()} processes uses all their "
            f"{total} devices (leave out --devices, or pass --devices {total})"
        )
    return total


def put_global_batches(group: Batch, mesh: jax.sharding.Mesh) -> Batch:
    """The multi-process :func:`~experiments.loop.programs.put_batches`: ``group`` holds the
    whole global batches (every process builds the same ones); each process hands its
    devices only its own rows of the batch axis (axis 1), which the returned global arrays
    span over all processes.

    Args:
      group: pytree of host arrays, every leaf ``[steps, batch, ...]``.
      mesh: the global mesh, whose ``data`` axis splits the batch.

    Returns:
      The same pytree as global ``jax.Array``s sharded ``P(None, "data")``.
    """
    sharding = NamedSharding(mesh, P(None, "data"))

    def put(a: np.ndarray) -> jax.Array:
        a = np.asarray(a)
        rows = _process_rows(sharding, a.shape)
        return jax.make_array_from_process_local_data(sharding, a[:, rows], a.shape)

    return jax.tree.map(put, group)


def _process_rows(sharding: NamedSharding, shape: tuple[int, ...]) -> slice:
    """The contiguous rows of the batch axis that this process's devices hold."""
    spans = {
        index[1].indices(shape[1])[:2]
        for index in sharding.addressable_devices_indices_map(shape).values()
    }
    start, stop = min(s for s, _ in spans), max(e for _, e in spans)
    covered = sum(e - s for s, e in spans)
    if covered != stop - start:
        raise ValueError(f"this process's devices hold rows that are not contiguous: {spans}")
    return slice(start, stop)
