"""Submit, stop waiting, and pick the results up later from another process.

Run ``python reload_tasks.py submit``: it prints the task group id and exits without
waiting; ``python reload_tasks.py collect GROUP`` gets every result back.
"""
import os
import sys

from gc_client.globus_compute import Executor

ENDPOINT_ID = os.environ["ENDPOINT_ID"]


def slow_double(x):
    import time
    time.sleep(0.5)
    return 2 * x


if sys.argv[1] == "submit":
    gce = Executor(endpoint_id=ENDPOINT_ID)
    futures = [gce.submit(slow_double, x) for x in range(6)]
    print(gce.task_group_id)
    gce.shutdown(wait=False, cancel_futures=False)
else:
    with Executor(endpoint_id=ENDPOINT_ID, task_group_id=sys.argv[2]) as gce:
        futures = gce.reload_tasks()
        print("reloaded:", len(futures))
        print("values:", sorted(f.result() for f in futures))
