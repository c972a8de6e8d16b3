"""Results over a chosen port (the SDK's amqp_port, e.g. 443 behind a strict firewall)."""
import os

from gc_client.globus_compute import Client, Executor

ENDPOINT_ID = os.environ["ENDPOINT_ID"]
PORT = int(os.environ["AMQP_PORT"])


def where():
    import socket
    return socket.gethostname()


gcc = Client()
with Executor(endpoint_id=ENDPOINT_ID, client=gcc, amqp_port=PORT) as gce:
    print("ran on:", gce.submit(where).result() == os.uname().nodename)
