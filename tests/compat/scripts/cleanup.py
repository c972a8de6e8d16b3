"""Housekeeping: delete a function you registered, and a scratch endpoint by its name."""
import os

from gc_client.globus_compute import Client

SCRATCH = os.environ["SCRATCH_ENDPOINT_NAME"]


def scratch_function():
    return 42


gcc = Client()
function_id = gcc.register_function(scratch_function)
print("deleted function:", gcc.delete_function(function_id)["function_uuid"] == function_id)
print("registered again:", gcc.register_function(scratch_function) != function_id)
for ep in gcc.get_endpoints():
    if ep["name"] == SCRATCH:
        gcc.delete_endpoint(ep["uuid"])
        print("deleted endpoint", ep["name"])
print("left:", [ep["name"] for ep in gcc.get_endpoints() if ep["name"] == SCRATCH])
