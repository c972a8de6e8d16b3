"""The SDK's first example: one function, one endpoint, one result."""
import os

from gc_client.globus_compute import Executor

ENDPOINT_ID = os.environ["ENDPOINT_ID"]


def hello_world():
    return "Hello World!"


with Executor(endpoint_id=ENDPOINT_ID) as gce:
    future = gce.submit(hello_world)
    print("Submitted the function to Globus Compute")
    print(future.result())
