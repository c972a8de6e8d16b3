"""An MPI command: ranks from the Executor's resource specification."""
import os

from gc_client.globus_compute import Executor, MPIFunction

ENDPOINT_ID = os.environ["ENDPOINT_ID"]

greet = MPIFunction("echo 'hello from a rank'")
with Executor(endpoint_id=ENDPOINT_ID) as gce:
    gce.resource_specification = {"num_nodes": 1, "ranks_per_node": 3}
    result = gce.submit(greet).result()
    print("ranks:", result.stdout.count("hello from a rank"))
    print("command:", result.cmd)
