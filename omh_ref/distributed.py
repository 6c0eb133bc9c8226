"""Running extraction chunks on Dask (``[dist]`` extra: ``dask[distributed]``).

``scheduler`` is ``local:N`` (a LocalCluster of N single-threaded worker processes on this
machine) or the address of a running scheduler (``tcp://host:8786``), whose workers must have
omh-ref installed and see the output folder at the same path (a shared file system). Each chunk is
one task; the driver records a chunk as done only when its task has returned, after the worker
has written and fsynced its rows. Dask reschedules the task of a worker that dies; if the driver
itself dies, the next run redoes exactly the chunks not recorded.
"""
from __future__ import annotations

import logging
import uuid

from .errors import InputError


def client_for(scheduler: str):
    """(client, cluster or None) for ``local:N`` or a scheduler address."""
    try:
        from dask.distributed import Client, LocalCluster
    except ImportError:
        raise InputError(f"--scheduler {scheduler}: needs Dask (pip install 'omh-ref[dist]')") from None
    if scheduler.startswith("local:"):
        n = scheduler.split(":", 1)[1]
        if not n.isdigit() or int(n) < 1:
            raise InputError(f"--scheduler {scheduler}: expected local:N with N a positive number of workers")
        cluster = LocalCluster(n_workers=int(n), threads_per_worker=1, processes=True,
                               dashboard_address=None, silence_logs=logging.ERROR)
        return Client(cluster), cluster
    try:
        return Client(scheduler, timeout="20s"), None
    except (OSError, TimeoutError, ValueError) as e:
        raise InputError(f"--scheduler {scheduler}: cannot reach a Dask scheduler ({e})") from None


def run_on_dask(tasks, scheduler: str, on_result, fn=None):
    """Run ``fn(task)`` (default: :func:`omh_ref.extract.run_chunk`) for every task on Dask and call
    ``on_result(result)`` in the driver as each one finishes, in completion order. The first task
    error cancels the rest and is raised here."""
    from dask.distributed import as_completed

    if fn is None:
        from .extract import run_chunk as fn
    client, cluster = client_for(scheduler)
    run = uuid.uuid4().hex[:8]
    futures = []
    try:
        futures = [client.submit(fn, t, key=f"omh-ref-chunk-{run}-{t.chunk}", pure=False) for t in tasks]
        for fut in as_completed(futures):
            on_result(fut.result())
    finally:
        client.cancel(futures)
        client.close()
        if cluster is not None:
            cluster.close()
