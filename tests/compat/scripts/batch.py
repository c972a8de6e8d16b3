"""Many calls in one request: create_batch, batch_run, then get_batch_result until done."""
import os
import time

from gc_client.globus_compute import Client

ENDPOINT_ID = os.environ["ENDPOINT_ID"]


def squared(x):
    return x * x


gcc = Client()
func_id = gcc.register_function(squared)
batch = gcc.create_batch()
for x in range(10):
    batch.add(func_id, args=[x])
response = gcc.batch_run(ENDPOINT_ID, batch)
task_ids = response["tasks"][func_id]
print("task group:", response["task_group_id"] == batch.task_group_id)
print("endpoint:", response["endpoint_id"] == ENDPOINT_ID)
while True:
    results = gcc.get_batch_result(task_ids)
    if not any(r["pending"] for r in results.values()):
        break
    time.sleep(0.5)
print("results:", [results[t]["result"] for t in task_ids])
print("completion times:", all(results[t]["completion_t"] for t in task_ids))
