"""The four-line Executor example: run a function on an endpoint, get its value back.

Run it with the local stack up (`make demo` does that) or set GC_ENDPOINT_ID.
"""

import os

from gc_client import Executor

ENDPOINT_ID = os.environ["GC_ENDPOINT_ID"]


def hello_world():
    return "Hello World!"


with Executor(endpoint_id=ENDPOINT_ID) as ex:
    print(ex.submit(hello_world).result())
