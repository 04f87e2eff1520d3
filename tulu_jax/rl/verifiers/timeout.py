"""Run a function on many items in worker processes, each item under a wall-clock deadline.

A timed-out item's worker is killed (SIGKILL) and replaced, so a deadline holds whatever the item does: a regular
expression or a big-integer power in C code, which no signal can interrupt, or a caller that is not the main thread.
Workers are fresh interpreters (``subprocess``, not ``fork``: safe beside JAX's threads, and unlike multiprocessing's
``spawn`` they never re-run the caller's ``__main__``). They warm up once and are reused across calls; an item's
clock starts when a warmed-up worker receives it. Messages are length-prefixed pickles over the worker's stdin and
a private copy of its stdout (its fd 1 is pointed at stderr, so stray prints cannot corrupt the protocol).
"""

from __future__ import annotations

import atexit
import collections
import importlib
import os
import pickle
import signal
import struct
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing.connection import wait
from typing import IO, Any

_HEADER = struct.Struct("<Q")
_READY = "ready"
# A worker that exceeds this much address space gets MemoryError instead of swapping the host to death.
DEFAULT_MEMORY_LIMIT_BYTES = 4 << 30
DEFAULT_STARTUP_TIMEOUT_S = 300.0


def _send(stream: IO[bytes], obj: Any) -> None:
    payload = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    stream.write(_HEADER.pack(len(payload)) + payload)
    stream.flush()


def _recv(stream: IO[bytes]) -> Any:
    header = stream.read(_HEADER.size)
    if len(header) < _HEADER.size:
        raise EOFError
    (size,) = _HEADER.unpack(header)
    payload = stream.read(size)
    if len(payload) < size:
        raise EOFError
    return pickle.loads(payload)


def _qualified_name(fn: Callable[..., Any]) -> str:
    name = f"{fn.__module__}:{fn.__qualname__}"
    if "<" in name or fn.__module__ == "__main__":
        raise ValueError(f"{name} must be a module-level function of an importable module")
    return name


def _resolve(name: str) -> Callable[..., Any]:
    module, _, qualname = name.partition(":")
    obj: Any = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def _limit_cpu(seconds: float) -> None:
    """Let the kernel end this worker (SIGXCPU) once the current item has used ``seconds`` of CPU.

    The parent kills a worker at the item's wall-clock deadline, which comes first (CPU time <= wall time); this
    limit only matters when the parent is gone, so that an orphan stuck in C code cannot spin forever.
    """
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    soft = int(usage.ru_utime + usage.ru_stime + seconds) + 1
    _, hard = resource.getrlimit(resource.RLIMIT_CPU)
    resource.setrlimit(resource.RLIMIT_CPU, (soft if hard == resource.RLIM_INFINITY else min(soft, hard), hard))


def worker_main() -> None:
    """Entry point of a worker process (argv: warm-up function name or "", memory limit in bytes or "")."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and kills us
    warm_up, memory_limit = sys.argv[1:3]
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    inp = sys.stdin.buffer
    if memory_limit:
        import resource

        _, hard = resource.getrlimit(resource.RLIMIT_AS)
        soft = int(memory_limit) if hard == resource.RLIM_INFINITY else min(int(memory_limit), hard)
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
    if warm_up:
        _resolve(warm_up)()
    _send(out, _READY)
    functions: dict[str, Callable[..., Any]] = {}
    while True:
        try:
            index, name, args, cpu_limit_s = _recv(inp)
        except EOFError:  # the parent closed the pipe or died
            return
        _limit_cpu(cpu_limit_s)
        try:
            if name not in functions:
                functions[name] = _resolve(name)
            _send(out, (index, True, functions[name](*args)))
        except Exception:  # report and keep serving: the parent decides what an error means
            _send(out, (index, False, traceback.format_exc()))


@dataclass
class _Worker:
    process: subprocess.Popen[bytes]
    started: float
    ready: bool = False
    task: int | None = None
    deadline: float = 0.0


class WorkerPool:
    """``num_workers`` persistent processes that apply a function to items, each under a deadline.

    Args:
      num_workers: processes to run at once.
      warm_up: a module-level function each worker runs once before taking items (imports, models).
      memory_limit_bytes: address-space limit of each worker (None: no limit).
      startup_timeout_s: how long a worker may take to start and warm up before the pool gives up with an error.
    """

    def __init__(
        self,
        num_workers: int,
        *,
        warm_up: Callable[[], None] | None = None,
        memory_limit_bytes: int | None = DEFAULT_MEMORY_LIMIT_BYTES,
        startup_timeout_s: float = DEFAULT_STARTUP_TIMEOUT_S,
    ):
        if num_workers < 1:
            raise ValueError(f"num_workers must be at least 1, got {num_workers}")
        self.num_workers = num_workers
        self._argv = [
            sys.executable,
            "-c",
            "from tulu_jax.rl.verifiers.timeout import worker_main; worker_main()",
            _qualified_name(warm_up) if warm_up else "",
            str(memory_limit_bytes) if memory_limit_bytes else "",
        ]
        self._startup_timeout_s = startup_timeout_s
        self._workers: list[_Worker] = []
        self._warmed = False  # whether a worker has ever been ready (the first start-up is never counted)
        self._lock = threading.Lock()

    def _start(self) -> _Worker:
        # The worker imports what this process can import, wherever it was started from.
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
        process = subprocess.Popen(self._argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
        return _Worker(process, time.monotonic())

    @staticmethod
    def _kill(worker: _Worker) -> None:
        worker.process.kill()
        worker.process.wait()
        for stream in (worker.process.stdin, worker.process.stdout):
            if stream is not None:
                stream.close()

    def map(
        self, fn: Callable[..., Any], items: Sequence[tuple[Any, ...]], timeout_s: float,
        max_wait_s: float | None = None,
    ) -> list[Any | None]:
        """``[fn(*item) for item in items]`` in the workers; an item past ``timeout_s`` seconds gives None.

        An item whose worker dies (crash, memory limit) also gives None. An exception raised by ``fn`` is re-raised
        here as RuntimeError with the worker's traceback. ``fn`` must be a module-level function.
        ``max_wait_s``: bounds the whole call once the pool has warmed up (the pool's first start-up is not
        counted): waiting for a replacement worker to warm up counts, and items not finished by then give None.
        """
        if timeout_s <= 0 or (max_wait_s is not None and max_wait_s <= 0):
            raise ValueError(f"timeout_s and max_wait_s must be positive, got {timeout_s}, {max_wait_s}")
        name = _qualified_name(fn)
        with self._lock:
            try:
                return self._map(name, items, timeout_s, max_wait_s)
            except BaseException:
                self._kill_all()  # workers may hold stale items: start afresh next time
                raise

    def _map(
        self, name: str, items: Sequence[tuple[Any, ...]], timeout_s: float, max_wait_s: float | None
    ) -> list[Any | None]:
        results: list[Any | None] = [None] * len(items)
        todo = collections.deque(range(len(items)))
        while len(self._workers) < self.num_workers:
            self._workers.append(self._start())
        remaining = len(items)
        call_end = float("inf")
        while remaining:
            if max_wait_s is not None and call_end == float("inf") and self._warmed:
                call_end = time.monotonic() + max_wait_s
            if todo and time.monotonic() >= call_end:  # out of time before a worker was free: not scored
                remaining -= len(todo)
                todo.clear()
                continue
            for i, worker in enumerate(self._workers):
                if worker.ready and worker.task is None and todo:
                    worker.task = todo.popleft()
                    worker.deadline = min(time.monotonic() + timeout_s, call_end)
                    try:
                        _send(worker.process.stdin, (worker.task, name, items[worker.task], 2 * timeout_s + 1))
                    except OSError:  # it died while idle: the item never ran, give it to another worker
                        todo.appendleft(worker.task)
                        worker.task = None
                        self._replace(i, "exited")
            waiting = [w for w in self._workers if w.task is not None or not w.ready]
            if not waiting:
                continue
            deadlines = [self._deadline(w) for w in waiting] + ([call_end] if todo else [])
            timeout = max(0.0, min(deadlines) - time.monotonic())
            readable = set(wait([w.process.stdout for w in waiting], timeout=timeout))
            for i, worker in enumerate(self._workers):
                if worker.process.stdout in readable:
                    remaining -= self._receive(i, results)
                elif (worker.task is not None or not worker.ready) and time.monotonic() >= self._deadline(worker):
                    remaining -= self._replace(i, "timed out")
        return results

    def _deadline(self, worker: _Worker) -> float:
        return worker.deadline if worker.ready else worker.started + self._startup_timeout_s

    def _receive(self, i: int, results: list[Any | None]) -> int:
        """Read worker ``i``'s message; return how many items ended (0 or 1)."""
        worker = self._workers[i]
        try:
            message = _recv(worker.process.stdout)
        except (EOFError, OSError):
            return self._replace(i, "exited")
        if message == _READY:
            worker.ready = self._warmed = True
            return 0
        index, ok, value = message
        if not ok:
            raise RuntimeError(f"verifier worker raised on item {index}:\n{value}")
        results[index] = value
        worker.task = None
        return 1

    def _replace(self, i: int, what: str) -> int:
        """Kill worker ``i`` and start another; return 1 if it held an item (which ends without a result)."""
        worker = self._workers[i]
        self._kill(worker)
        if not worker.ready:
            raise RuntimeError(
                f"verifier worker {what} during start-up (exit code {worker.process.returncode}, "
                f"limit {self._startup_timeout_s} s); see its stderr above"
            )
        self._workers[i] = self._start()
        return int(worker.task is not None)

    def _kill_all(self) -> None:
        for worker in self._workers:
            self._kill(worker)
        self._workers.clear()

    def close(self) -> None:
        """Stop all workers now."""
        with self._lock:
            self._kill_all()


_POOLS: dict[tuple[int, Callable[[], None] | None], WorkerPool] = {}
_POOLS_LOCK = threading.Lock()


def shared_pool(num_workers: int, warm_up: Callable[[], None] | None = None) -> WorkerPool:
    """A process-wide pool of ``num_workers`` workers, created on first use and closed at exit."""
    with _POOLS_LOCK:
        key = (num_workers, warm_up)
        if key not in _POOLS:
            _POOLS[key] = WorkerPool(num_workers, warm_up=warm_up)
        return _POOLS[key]


@atexit.register
def close_shared_pools() -> None:
    """Stop every shared pool's workers (also run at interpreter exit)."""
    with _POOLS_LOCK:
        for pool in _POOLS.values():
            pool.close()
        _POOLS.clear()


MAX_DEFAULT_WORKERS = 16  # a TPU host has hundreds of CPUs; verifying one RL batch needs far fewer workers


def default_num_workers() -> int:
    """One worker per CPU this process may use, at most ``MAX_DEFAULT_WORKERS``."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(cpus, MAX_DEFAULT_WORKERS))
