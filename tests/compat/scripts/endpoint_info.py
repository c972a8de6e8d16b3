"""What the SDK tells about endpoints: the list, one's status, its metadata."""
import os

from gc_client.globus_compute import Client

ENDPOINT_ID = os.environ["ENDPOINT_ID"]

gcc = Client()
endpoints = gcc.get_endpoints()
mine = [ep for ep in endpoints if ep["uuid"] == ENDPOINT_ID]
print("listed:", len(mine), mine[0]["name"] == mine[0]["display_name"])
status = gcc.get_endpoint_status(ENDPOINT_ID)
print("status:", status["status"])
print("workers:", status["details"]["total_workers"], status["details"]["idle_workers"] is not None)
metadata = gcc.get_endpoint_metadata(ENDPOINT_ID)
print("host:", metadata["hostname"] == os.uname().nodename, metadata["name"] == mine[0]["name"])
