"""The hardware a worker runs on, from the Executor and from the Client."""
import os
import time

from gc_client.globus_compute import Client, Executor, TaskPending

ENDPOINT_ID = os.environ["ENDPOINT_ID"]

with Executor(ENDPOINT_ID) as gcx:
    report = gcx.get_worker_hardware_details()
print(report.splitlines()[0])
print("has cpus:", any(line.startswith("cpus:") for line in report.splitlines()))

gcc = Client()
task_id = gcc.get_worker_hardware_details(ENDPOINT_ID)
while True:
    try:
        print("client report:", gcc.get_result(task_id).splitlines()[0])
        break
    except TaskPending:
        time.sleep(0.5)
