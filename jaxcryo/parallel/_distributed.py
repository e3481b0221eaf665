"""Several processes (hosts) in one run: :func:`jax.distributed.initialize` and each process's share of a batch.

A multi-process run is ``P`` copies of the same program, one per host (or per group of devices), that find
each other through a coordinator (process 0's ``HOST:PORT``) and then see every process's devices in
:func:`jax.devices`. :mod:`jaxcryo.parallel` builds its 1-D mesh over those global devices, ordered by
process, so each process's devices hold one contiguous block of every global batch
(:func:`process_share`); each process reads only that block from disk and the blocks are assembled into
one global array (:func:`jax.make_array_from_process_local_data`). The step's ``psum`` then runs across
processes. The volume and the optimiser state are replicated, so every process holds the result.

Settings (:func:`resolve`): the arguments, else the environment variables ``JAX_COORDINATOR_ADDRESS`` (read
by JAX itself too), ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID`` (JAX 0.9 does not read the last two; jaxcryo
does). ``coordinator_address="auto"`` leaves every setting to JAX's cluster detection (Slurm, Open MPI,
``mpi4py``, Cloud TPU). Nothing given: one process, :func:`initialize` does nothing.

CPU devices need a cross-process collectives implementation: JAX's ``jax_cpu_collectives_implementation``
(``gloo`` over TCP by default in JAX 0.9, ``mpi`` as the alternative); :func:`initialize` sets ``gloo``
unless one is already chosen.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import jax

from ..errors import InputError
from ..jax_util import AXIS

#: The environment variables read when an argument is not given (argument name -> variable).
ENV = {"coordinator_address": "JAX_COORDINATOR_ADDRESS", "num_processes": "JAX_NUM_PROCESSES",
       "process_id": "JAX_PROCESS_ID"}

#: The parameter names the errors carry (the command line shows them as ``--coordinator`` etc.).
PARAMS = {"coordinator_address": "coordinator", "num_processes": "num_processes", "process_id": "process_id"}

WHAT = {"coordinator_address": "process 0's HOST:PORT", "num_processes": "the process count",
        "process_id": "this process's id"}

#: ``coordinator_address`` value leaving every setting to JAX's cluster detection.
AUTO = "auto"


@dataclass(frozen=True)
class Settings:
    """A resolved multi-process configuration (``auto``: left to JAX's cluster detection)."""

    coordinator_address: str | None
    num_processes: int | None
    process_id: int | None
    auto: bool = False


def _int(value, name: str, source: str | None):
    if value is None or isinstance(value, int) and not isinstance(value, bool):
        return value
    try:
        return int(str(value).strip())
    except ValueError:
        where = f"{source}={value!r}" if source else f"{{param}} {value!r}"
        raise InputError(f"{where}: expected an integer", param=None if source else PARAMS[name]) from None


def _check_address(addr: str, source: str | None) -> str:
    where = f"{source}={addr!r}" if source else f"{{param}} {addr!r}"
    param = None if source else PARAMS["coordinator_address"]
    host, sep, port = addr.strip().rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise InputError(f"{where}: expected HOST:PORT, process 0's address and a free port "
                         "(e.g. 127.0.0.1:12345 on one machine)", param=param)
    return addr.strip()


def resolve(coordinator_address: str | None = None, num_processes: int | str | None = None,
            process_id: int | str | None = None, environ=None) -> Settings | None:
    """The multi-process settings from the arguments, else the environment (:data:`ENV`); ``None``: one
    process (nothing given, or ``num_processes`` 1).

    Raises :class:`~jaxcryo.errors.InputError` for a malformed address, non-integer or out-of-range counts,
    or a partial configuration (the message names the missing flags' parameters and variables).
    """
    env = os.environ if environ is None else environ
    given = {"coordinator_address": coordinator_address, "num_processes": num_processes, "process_id": process_id}
    values, sources = {}, {}
    for name, value in given.items():
        if value is None and env.get(ENV[name], "").strip():
            value, sources[name] = env[ENV[name]].strip(), ENV[name]
        values[name] = value
    addr = values["coordinator_address"]
    if isinstance(addr, str) and addr.strip().lower() == AUTO:
        # explicit counts with "auto": JAX's detection fills in only what is missing
        return Settings(None, _int(values["num_processes"], "num_processes", sources.get("num_processes")),
                        _int(values["process_id"], "process_id", sources.get("process_id")), auto=True)
    n = _int(values["num_processes"], "num_processes", sources.get("num_processes"))
    i = _int(values["process_id"], "process_id", sources.get("process_id"))
    if addr is None and n is None and i is None:
        return None
    if n is not None and n < 1:
        src = sources.get("num_processes")
        raise InputError(f"{src + '=' if src else '{param} '}{n}: expected at least 1",
                         param=None if src else "num_processes")
    if n == 1 and i in (None, 0):
        return None  # one process: nothing to coordinate
    missing = [name for name, v in (("coordinator_address", addr), ("num_processes", n), ("process_id", i))
               if v is None]
    if missing:
        also = "".join(f"; also missing: {WHAT[m]} ({ENV[m]})" for m in missing[1:])
        raise InputError(f"{{param}} not given (nor {ENV[missing[0]]}): a multi-process run needs "
                         f"{WHAT[missing[0]]}{also} (or coordinator 'auto' to let JAX detect a Slurm, Open MPI or "
                         "mpi4py launch)", param=PARAMS[missing[0]])
    addr = _check_address(str(addr), sources.get("coordinator_address"))
    if not 0 <= i < n:
        src = sources.get("process_id")
        raise InputError(f"{src + '=' if src else '{param} '}{i}: expected 0 <= id < {n} (the process count)",
                         param=None if src else "process_id")
    return Settings(addr, n, i)


def _backends_started() -> bool:
    try:
        from jax._src import xla_bridge

        return bool(xla_bridge.backends_are_initialized())
    except (ImportError, AttributeError):  # private API moved: let JAX's own check speak
        return False


def is_initialized() -> bool:
    """Whether :func:`jax.distributed.initialize` has run in this process."""
    return bool(jax.distributed.is_initialized())


_current: Settings | None = None


def initialize(coordinator_address: str | None = None, num_processes: int | str | None = None,
               process_id: int | str | None = None, *, timeout: int = 300, environ=None) -> bool:
    """Join a multi-process run (:func:`jax.distributed.initialize`); ``False`` when there is only one process.

    Must run before JAX starts its devices (before any computation, :func:`jax.devices` included). Settings
    as in :func:`resolve`. Enables the ``gloo`` CPU collectives unless another implementation was chosen
    (``jax_cpu_collectives_implementation``). ``timeout``: seconds to wait for the other processes. Calling
    it again with the same settings does nothing; with others it raises.

    Raises :class:`~jaxcryo.errors.InputError` for bad settings, when JAX has already started, or when the
    coordinator cannot be reached in ``timeout`` seconds.
    """
    global _current
    settings = resolve(coordinator_address, num_processes, process_id, environ)
    if settings is None:
        return False
    if is_initialized():
        if _current is not None and (settings == _current or settings.auto):
            return True
        raise InputError(f"this process already joined a multi-process run ({_current}); it cannot join "
                         f"another ({settings})")
    if _backends_started():
        raise InputError("a multi-process run must be set up before JAX starts its devices: call "
                         "jaxcryo.parallel.initialize (or pass the flags) before any computation")
    if jax.config.jax_cpu_collectives_implementation is None:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    kwargs: dict[str, Any] = dict(initialization_timeout=int(timeout))
    if not settings.auto:
        kwargs["cluster_detection_method"] = "deactivate"
    try:
        jax.distributed.initialize(settings.coordinator_address, settings.num_processes, settings.process_id,
                                   **kwargs)
    except (ValueError, TypeError) as e:  # JAX's detection found no cluster, or rejected a value
        raise InputError(f"jax.distributed.initialize: {' '.join(str(e).split())}") from e
    except Exception as e:  # noqa: BLE001 - XLA raises its own types for connection failures
        msg = " ".join(str(e).split())[:300]
        raise InputError(f"could not join the multi-process run at {settings.coordinator_address} as process "
                         f"{settings.process_id} of {settings.num_processes} within {timeout} s "
                         f"({type(e).__name__}: {msg})") from e
    _current = settings if not settings.auto else Settings(
        settings.coordinator_address, jax.process_count(), jax.process_index(), auto=True)
    return True


def process_count() -> int:
    """Processes in the run (1 without :func:`initialize`)."""
    return int(jax.process_count())


def process_index() -> int:
    """This process's id (0 without :func:`initialize`)."""
    return int(jax.process_index())


def is_main_process() -> bool:
    """Whether this is process 0, the one that writes a run's outputs."""
    return process_index() == 0


def process_share(n: int, mesh=None) -> slice:
    """The rows of a global batch of ``n`` (a multiple of the mesh's device count) this process holds.

    With a ``mesh`` (:func:`jaxcryo.parallel.make_mesh`): the rows its batch sharding
    (``P("data")``) places on this process's devices, which :func:`~jaxcryo.parallel.make_mesh` makes one
    contiguous block (raises ``ValueError`` for a mesh that does not). Without: the contiguous block
    ``[p n / P, (p + 1) n / P)`` of process ``p`` of ``P``.
    """
    n = int(n)
    if mesh is None:
        count, index = process_count(), process_index()
        if n % count:
            raise ValueError(f"a batch of {n} does not split over {count} processes")
        k = n // count
        return slice(index * k, (index + 1) * k)
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(AXIS))
    idx = sharding.addressable_devices_indices_map((n,))
    blocks = sorted({(s[0].start or 0, n if s[0].stop is None else s[0].stop) for s in idx.values()})
    start, stop = blocks[0][0], blocks[0][1]
    for a, b in blocks[1:]:
        if a != stop:
            raise ValueError(f"this process's devices hold rows {blocks} of the batch: not one block")
        stop = b
    return slice(start, stop)


#: The command-line flags of :func:`initialize`'s settings (``jaxcryo reconstruct``).
FLAGS = {"--coordinator": "coordinator_address", "--num-processes": "num_processes", "--process-id": "process_id"}


def settings_from_argv(argv: list[str]) -> dict:
    """The values of :data:`FLAGS` on a command line (``--flag V`` or ``--flag=V``, the last one wins; up to a
    ``--``), as :func:`initialize`'s keyword arguments. Read before the parser runs, so that the run is joined
    before anything (``--platform``) starts JAX's devices."""
    out: dict = {}
    for k, a in enumerate(argv):
        if a == "--":
            break
        name, eq, value = a.partition("=")
        if name in FLAGS:
            if eq:
                out[FLAGS[name]] = value
            elif k + 1 < len(argv):
                out[FLAGS[name]] = argv[k + 1]
    return out
