"""Running omh-ref's big jobs on Dask (``[dist]`` extra: ``dask[distributed]``).

``scheduler`` is ``local:N`` (a LocalCluster of N single-threaded worker processes on this
machine) or the address of a running scheduler (``tcp://host:8786``), whose workers must have
omh-ref installed and see the data and output folders at the same paths (a shared file system).

It knows no job: a caller hands :func:`run_all` its task function. Two jobs use it: extraction (one task per chunk of images; the driver records a chunk as done
only when its task has returned, after the worker has written and fsynced its rows) and the KNN
table (pooling by row ranges, then top-k by row ranges against the pooled matrix, broadcast once).
Dask reschedules the task of a worker that dies; if the driver itself dies, an extraction's next
run redoes exactly the chunks not recorded. Tasks cut the work at the same boundaries as the
single-process code, so the outputs are byte-identical.
"""
from __future__ import annotations

import contextlib
import logging
import uuid

from ..core.errors import InputError


@contextlib.contextmanager
def dask_client(scheduler: str):
    """A connected ``distributed.Client`` for ``local:N`` or a scheduler address; closed on exit
    (with its LocalCluster, if it made one)."""
    try:
        from dask.distributed import Client, LocalCluster
    except ImportError:
        raise InputError(f"--scheduler {scheduler}: needs Dask (pip install 'omh-ref[dist]')") from None
    cluster = None
    if scheduler.startswith("local:"):
        n = scheduler.split(":", 1)[1]
        if not n.isdigit() or int(n) < 1:
            raise InputError(f"--scheduler {scheduler}: expected local:N with N a positive number of workers")
        # CRITICAL: a task's error (a bad image under --on-error fail) reaches the driver, which
        # prints it as one line; the workers' own log of it would be a traceback on our stderr.
        cluster = LocalCluster(n_workers=int(n), threads_per_worker=1, processes=True,
                               dashboard_address=None, silence_logs=logging.CRITICAL)
        client = Client(cluster)
    else:
        try:
            client = Client(scheduler, timeout="20s")
        except (OSError, TimeoutError, ValueError) as e:
            raise InputError(f"--scheduler {scheduler}: cannot reach a Dask scheduler ({e})") from None
    try:
        yield client
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


def run_all(client, fn, args_list, on_result, name="omh-ref"):
    """``fn(*args)`` for every ``args`` in ``args_list`` on ``client``'s workers; ``on_result`` is
    called in the driver as each finishes (completion order). The first task error cancels the
    rest and is raised here."""
    from dask.distributed import as_completed

    run = uuid.uuid4().hex[:8]
    futures = []
    try:
        futures = [client.submit(fn, *args, key=f"{name}-{run}-{i}", pure=False)
                   for i, args in enumerate(args_list)]
        for fut in as_completed(futures):
            on_result(fut.result())
    finally:
        client.cancel(futures)
