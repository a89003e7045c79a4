"""Where Ray starts: ``init_ray`` is the one ``ray.init`` call of the CLI and the pipeline.

Library and pipeline functions (``build_pyramid``, ``run_schedule``, ``run_sweep``) never start
Ray themselves; they call ``require_ray`` and fail with a clear message when the caller did not.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

__all__ = ["exclusive", "init_ray", "require_ray", "resolve_address"]


def init_ray(address: str | None = None, quiet: bool = False, num_cpus: int | None = None) -> None:
    """Join ``address`` / ``RAY_ADDRESS``, or start a local Ray (``num_cpus`` logical CPUs: on a
    small machine a Tune trial, its Train worker and Ray Data's reads need more than the cores).
    ``quiet``: keep the workers' and Ray Data's log lines out of the terminal (they stay in the
    session's log folder). A Ray already started in this process is kept as it is."""
    import ray

    if quiet:
        ray.data.DataContext.get_current().enable_progress_bars = False
        for name in ("ray.data", "ray.train", "ray.tune"):
            logging.getLogger(name).setLevel(logging.WARNING)
        logging.getLogger("ray").setLevel(logging.ERROR)  # start-up notices; --verbose shows them
        logging.getLogger("mlflow").setLevel(logging.WARNING)  # store creation notices
    if ray.is_initialized():
        return
    address = resolve_address(address or os.environ.get("RAY_ADDRESS"))
    local = {} if address != "local" else {"include_dashboard": False,
                                           **({"num_cpus": num_cpus} if num_cpus else {})}
    ray.init(address=address, log_to_driver=not quiet, **local)


def _answers(host_port: str, timeout: float) -> bool:
    host, _, port = host_port.rpartition(":")
    try:
        with socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout):
            return True
    except (OSError, ValueError):
        return False


def resolve_address(address: str | None, timeout: float = 10.0) -> str:
    """The address to give ``ray.init``, checked within ``timeout`` seconds (``ray.init`` itself
    retries a dead head for minutes): a ``host:port`` or ``ray://`` address must answer, else
    ``RuntimeError`` naming it; ``None``/``"auto"`` join the cluster that ``ray start`` recorded on
    this machine if its head answers, and otherwise (no cluster, or a stale record of a dead one)
    start a local Ray (``"local"``)."""
    from ray._private.utils import get_ray_address_file

    if address in (None, "auto"):
        recorded = Path(get_ray_address_file(None))
        head = recorded.read_text().strip() if recorded.is_file() else ""
        if head and _answers(head, timeout):
            return head
        if address == "auto":
            raise RuntimeError(f"address auto: no running Ray cluster recorded in {recorded}"
                               + (f" (its head {head} does not answer)" if head else ""))
        return "local"
    if address == "local" or address.startswith(("http://", "https://")):
        return address
    target = address.split("://", 1)[-1]
    if not _answers(target, timeout):
        raise RuntimeError(f"no Ray head answers at {address} (tried for {timeout:.0f} s): is the "
                           "cluster up, and is RAY_ADDRESS / --address right?")
    return address


def require_ray(what: str) -> None:
    """``RuntimeError`` naming ``what`` unless Ray is started in this process."""
    import ray

    if not ray.is_initialized():
        raise RuntimeError(f"{what} needs Ray: start it first with pipelines.runtime.init_ray() "
                           "(the mscnn CLI does) or ray.init(...)")


@contextlib.contextmanager
def exclusive(lock: str | os.PathLike, what: str, wait: bool = False) -> Iterator[None]:
    """Hold an exclusive ``flock`` on the file ``lock`` for the block; if another process (or
    another open in this one) holds it, ``RuntimeError`` naming ``what`` and the holder (pid, host,
    start time, written into the file), or with ``wait`` wait for it. The kernel drops the lock
    when its holder dies, so a killed run never leaves a stale lock."""
    lock = Path(lock)
    lock.parent.mkdir(parents=True, exist_ok=True)
    f = open(lock, "a+")  # noqa: SIM115 (held for the whole block)
    try:
        fcntl.flock(f, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise RuntimeError(f"{what} is already running ({holder}); lock file {lock}") from None
    try:
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()} since "
                f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        f.flush()
        yield
    finally:
        fcntl.flock(f, fcntl.LOCK_UN)
        f.close()
