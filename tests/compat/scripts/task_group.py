"""Two Executors, one task group: a later one adds to the group a first one started."""
import os
import time
import uuid

from gc_client.globus_compute import Client, Executor

ENDPOINT_ID = os.environ["ENDPOINT_ID"]
TASK_GROUP = str(uuid.uuid4())


def tag(name):
    return f"done: {name}"


gcc = Client()
with Executor(endpoint_id=ENDPOINT_ID, client=gcc, task_group_id=TASK_GROUP, label="a") as first:
    futures = [first.submit(tag, "a"), first.submit(tag, "b")]
    print(*(f.result() for f in futures))
with Executor(endpoint_id=ENDPOINT_ID, task_group_id=uuid.UUID(TASK_GROUP)) as second:
    print("same group:", second.task_group_id == TASK_GROUP)
    futures.append(second.submit(tag, "c"))
    print(futures[-1].result())
# The ledger records a result a moment after its future has it: ask until none is pending.
task_ids = [f.task_id for f in futures]
while True:
    results = gcc.get_batch_result(task_ids)
    if not any(r["pending"] for r in results.values()):
        break
    time.sleep(0.2)
print("group holds:", sorted(r["result"] for r in results.values()))
