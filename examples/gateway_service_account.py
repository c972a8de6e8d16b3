"""A science gateway runs functions for its community with one service account.

The gateway never holds its users' credentials. Each task names the end user it runs for
(the ``gc-on-behalf-of`` header); the ledger records both the gateway and the end user,
and the endpoint's agent checks that the submitter really is a service account.

Set up once (an administrator on the registry's host, then the endpoint's owner):

    gc-registry user create portal --service
    gc-registry token create portal --label "portal web app"   # the gateway's GC_TOKEN
    gc-client policy set ENDPOINT_ID --allow-user portal      # as the endpoint's owner

Then, with GC_TOKEN set to the gateway's token and GC_ENDPOINT_ID to the endpoint:

    python examples/gateway_service_account.py
"""

from __future__ import annotations

import os
import time

from gc_client import Client, Executor

ENDPOINT_ID = os.environ["GC_ENDPOINT_ID"]

#: What the gateway's web front end received: (end user, the sample they asked about).
REQUESTS = [("carol@uni.edu", "sample-17"), ("dave@lab.org", "sample-4"),
            ("carol@uni.edu", "sample-23")]


def analyse(sample: str) -> str:
    """Stand-in for the community's analysis code."""
    return f"{sample}: {sum(map(ord, sample)) % 97} peaks"


def main() -> None:
    client = Client()  # the gateway's identity: GC_TOKEN, or `gc-client login`
    print(f"gateway account: {client.whoami().name}")
    task_ids = []
    for end_user, sample in REQUESTS:
        # One Executor per end user: their tasks carry their identity and share a task group.
        with Executor(endpoint_id=ENDPOINT_ID, client=client, on_behalf_of=end_user) as ex:
            future = ex.submit(analyse, sample)
            print(f"for {end_user:<15} {future.result()}")
            task_ids.append(future.task_id)
    # The ledger records who asked: the gateway, and the end user it asked for.
    deadline = time.monotonic() + 30
    while True:
        tasks = [client.get_task(task_id) for task_id in task_ids]
        if all(t.status not in ("waiting", "unknown") for t in tasks) \
                or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    for task in tasks:
        print(f"ledger: task {task.task_id[:8]} by {task.user} on behalf of {task.on_behalf_of}: "
              f"{task.status}")
    client.close()


if __name__ == "__main__":
    main()
