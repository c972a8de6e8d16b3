"""A function that raises: the error and its remote traceback come back."""
import os

from gc_client.globus_compute import Executor, TaskExecutionFailed

ENDPOINT_ID = os.environ["ENDPOINT_ID"]


def divide(a, b):
    return a / b


with Executor(endpoint_id=ENDPOINT_ID) as gce:
    print(gce.submit(divide, 1, 4).result())
    try:
        gce.submit(divide, 1, 0).result()
    except TaskExecutionFailed as error:
        print("failed with:", error.remote_type)
        print("traceback names the function:", "in divide" in error.remote_traceback)
