"""Several cooperating processes (hosts): starting ``jax.distributed`` and who writes what.

The trainer is the same program on every process. After :func:`initialize`,
``jax.devices()`` lists the devices of all processes, the trainer's ``data`` mesh spans
them, and every jitted step, refresh and evaluation runs as one SPMD program:

- every process loads the (in-memory) dataset itself and places it, replicated, on its
  own devices (``jax.device_put`` of identical host values onto a global replicated
  sharding), so no process ever reads another's memory;
- the sampled batch indices, the k-means result and the evaluation metrics are computed
  from replicated inputs with the same keys, so they are identical on every process;
- only the main process (index 0) writes ``config.json``, ``history.jsonl``,
  ``metrics.json`` and draws the progress bar; checkpoints are written by all processes
  together through Orbax (each process its own shards, the main process the metadata).

Launch: the same command on every host, plus where the coordinator (process 0) listens,
the number of processes and this process's index — as flags of ``magnet-jax train``
(``--coordinator HOST:PORT --num-processes N --process-id I``) or the environment
variables ``MAGNET_JAX_COORDINATOR``, ``MAGNET_JAX_NUM_PROCESSES`` and
``MAGNET_JAX_PROCESS_ID``. ``--distributed auto`` lets JAX detect the cluster itself
(SLURM, Cloud TPU pods, ...), where it fills in all three.

On CPU the processes exchange collectives over gloo (TCP), which is how the test suite
runs two processes of two CPU devices each on one machine.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import time

import jax

ENV_COORDINATOR = "MAGNET_JAX_COORDINATOR"
ENV_NUM_PROCESSES = "MAGNET_JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "MAGNET_JAX_PROCESS_ID"

#: Seconds to wait for every process to join before giving up (``initialize``).
DEFAULT_JOIN_TIMEOUT = 120
#: Seconds without a heartbeat after which the others treat a process as dead.
DEFAULT_HEARTBEAT_TIMEOUT = 30


class JoinError(RuntimeError):
    """The processes could not be joined (see :func:`initialize`)."""


@dataclasses.dataclass(frozen=True)
class ProcessGroup:
    """Where this process stands among the cooperating processes.

    Attributes:
        coordinator: ``HOST:PORT`` of process 0's coordination service, or ``None`` when
            JAX detected the cluster itself.
        num_processes: how many processes cooperate.
        process_id: this process's index in ``[0, num_processes)``.
    """

    coordinator: str | None
    num_processes: int
    process_id: int


def from_environment(
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> ProcessGroup | None:
    """The process group that flags (taking precedence) and environment variables name.

    Returns ``None`` when none of the three is set (a single process). Raises
    ``ValueError`` naming the flag and the variable when only some are set or a value is
    out of range.
    """
    coordinator = coordinator or os.environ.get(ENV_COORDINATOR) or None
    num_processes = _int_setting(num_processes, ENV_NUM_PROCESSES, "--num-processes")
    process_id = _int_setting(process_id, ENV_PROCESS_ID, "--process-id")
    given = {
        "--coordinator / " + ENV_COORDINATOR: coordinator,
        "--num-processes / " + ENV_NUM_PROCESSES: num_processes,
        "--process-id / " + ENV_PROCESS_ID: process_id,
    }
    if all(value is None for value in given.values()):
        return None
    missing = [name for name, value in given.items() if value is None]
    if missing:
        raise ValueError(
            f"several processes need all of --coordinator, --num-processes and --process-id "
            f"(or their environment variables); missing: {', '.join(missing)}"
        )
    host, _, port = coordinator.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(
            f"--coordinator must be HOST:PORT (e.g. 10.0.0.1:8476), got {coordinator!r}"
        )
    if num_processes < 1:
        raise ValueError(f"--num-processes must be at least 1, got {num_processes}")
    if not 0 <= process_id < num_processes:
        raise ValueError(
            f"--process-id must lie in [0, {num_processes}) for --num-processes "
            f"{num_processes}, got {process_id}"
        )
    return ProcessGroup(coordinator, num_processes, process_id)


def _int_setting(value: int | None, variable: str, flag: str) -> int | None:
    if value is not None:
        return int(value)
    text = os.environ.get(variable)
    if text is None or text == "":
        return None
    try:
        return int(text)
    except ValueError:
        raise ValueError(
            f"{variable} (the environment's {flag}) must be an integer, got {text!r}"
        ) from None


def initialize(
    group: ProcessGroup | None = None,
    *,
    auto: bool = False,
    join_timeout: int = DEFAULT_JOIN_TIMEOUT,
    heartbeat_timeout: int = DEFAULT_HEARTBEAT_TIMEOUT,
) -> bool:
    """Starts ``jax.distributed`` for ``group`` (or JAX's own cluster detection).

    Must run before anything touches a JAX device. Does nothing and returns ``False``
    when ``group`` is ``None`` and ``auto`` is false (one process). It selects the gloo
    collectives for CPU devices, without which CPU processes cannot run collectives.

    Args:
        group: the processes to join (see :func:`from_environment`).
        auto: with no ``group``, let JAX detect the cluster (SLURM, Cloud TPU, ...).
        join_timeout: seconds to wait for all processes to join; then a :class:`JoinError`
            says which address was waited on, instead of a hang.
        heartbeat_timeout: seconds after which a silent process counts as dead and the
            others stop.

    Returns:
        Whether several processes were started.

    Raises:
        JoinError: the processes could not be joined (a port in use, a process that
            never came, a coordinator that cannot be reached).
    """
    if group is None and not auto:
        return False
    # CPU devices need a collectives implementation to talk across processes; the setting
    # only concerns the CPU backend, so it is harmless where GPUs or TPUs do the work.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    kwargs = {
        "initialization_timeout": int(join_timeout),
        "heartbeat_timeout_seconds": int(heartbeat_timeout),
    }
    if group is not None:
        kwargs.update(
            coordinator_address=group.coordinator,
            num_processes=group.num_processes,
            process_id=group.process_id,
        )
    if group is not None and group.num_processes > 1:
        # JAX's coordination client aborts the whole process (a C++ fatal error, no Python
        # exception) when a peer never comes; meeting once over plain TCP first turns a
        # port in use, a missing process or a duplicate --process-id into a clear error.
        rendezvous(group, timeout=join_timeout)
    where = f"the coordinator at {group.coordinator}" if group else "the detected cluster"
    try:
        jax.distributed.initialize(**kwargs)
    except Exception as error:  # XLA raises its own status errors; name what was waited on
        detail = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise JoinError(
            f"could not join {where} within {join_timeout} s "
            f"(process {group.process_id if group else '?'} of "
            f"{group.num_processes if group else '?'}): {detail}. Check that every process "
            f"was started with the same --coordinator and --num-processes, a distinct "
            f"--process-id, and that process 0 can listen on that port"
        ) from error
    return True


def rendezvous(group: ProcessGroup, *, timeout: float) -> None:
    """Waits until all ``group.num_processes`` processes have reached this point.

    Process 0 listens on the coordinator's port, collects one hello (a process id) from
    every other process and answers all of them once everyone is there; the others
    connect (retrying while process 0 is not yet up) and wait for that answer. The
    clients close their connections first, so the port is free again for JAX's
    coordination service right after.

    Raises:
        JoinError: the port cannot be listened on, a process id came twice, or not
            every process arrived within ``timeout`` seconds (naming the missing ones).
    """
    host, _, port = group.coordinator.rpartition(":")
    deadline = time.monotonic() + timeout
    if group.process_id == 0:
        _rendezvous_server(host, int(port), group, deadline, timeout)
    else:
        _rendezvous_client(host, int(port), group, deadline, timeout)


def _rendezvous_server(host, port, group, deadline, timeout) -> None:
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        server.bind(("", port))
    except OSError as error:
        server.close()
        raise JoinError(
            f"process 0 cannot listen on port {port} of --coordinator {group.coordinator}: "
            f"{error.strerror or error}; choose a free port"
        ) from None
    server.listen(group.num_processes)
    peers: dict[int, socket.socket] = {}
    try:
        while len(peers) < group.num_processes - 1:
            server.settimeout(max(deadline - time.monotonic(), 0.001))
            try:
                connection, _ = server.accept()
            except TimeoutError:
                missing = sorted(set(range(1, group.num_processes)) - set(peers))
                raise JoinError(
                    f"processes {missing} did not join the coordinator {group.coordinator} "
                    f"within {timeout:g} s (joined: 0{''.join(f', {p}' for p in sorted(peers))}); "
                    f"start every process with --num-processes {group.num_processes}"
                ) from None
            connection.settimeout(max(deadline - time.monotonic(), 0.001))
            try:
                peer = int(connection.recv(64).decode().strip() or -1)
            except (OSError, ValueError):
                connection.close()
                continue  # not one of ours (a port scanner, a stale client): ignore it
            if not 0 < peer < group.num_processes or peer in peers:
                connection.close()
                raise JoinError(
                    f"a process joined as --process-id {peer}, which is "
                    f"{'taken' if peer in peers or peer == 0 else 'out of range'} for "
                    f"--num-processes {group.num_processes}; give each process its own id"
                )
            peers[peer] = connection
        for connection in peers.values():
            connection.sendall(b"go\n")
        for connection in peers.values():
            connection.settimeout(max(deadline - time.monotonic(), 1.0))
            try:
                connection.recv(8)  # the client closes first: its end keeps the TIME_WAIT
            except OSError:
                pass
    finally:
        for connection in peers.values():
            connection.close()
        server.close()


def _rendezvous_client(host, port, group, deadline, timeout) -> None:
    while True:
        try:
            connection = socket.create_connection(
                (host, port), timeout=max(deadline - time.monotonic(), 0.001)
            )
            break
        except OSError:
            if time.monotonic() >= deadline:
                raise JoinError(
                    f"process {group.process_id} could not reach the coordinator "
                    f"{group.coordinator} within {timeout:g} s: is process 0 running, with "
                    f"the same --coordinator?"
                ) from None
            time.sleep(0.2)
    with connection:
        connection.settimeout(max(deadline - time.monotonic(), 0.001))
        try:
            connection.sendall(f"{group.process_id}\n".encode())
            answer = connection.recv(8)
        except OSError:
            answer = b""
        if not answer.startswith(b"go"):
            raise JoinError(
                f"process {group.process_id} reached the coordinator {group.coordinator} "
                f"but not every process joined within {timeout:g} s (or process 0 refused "
                f"it: see process 0's message)"
            )


def is_main_process() -> bool:
    """True on the process that writes logs and metrics (process 0; always so alone)."""
    return jax.process_index() == 0


def num_processes() -> int:
    """How many processes cooperate (1 without ``jax.distributed``)."""
    return jax.process_count()
