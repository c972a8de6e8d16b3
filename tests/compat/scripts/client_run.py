"""The Client's register-run-poll cycle, as scripts written before the Executor do it."""
import os
import time

from gc_client.globus_compute import Client, Executor, TaskPending

ENDPOINT_ID = os.environ["ENDPOINT_ID"]


def hello(firstname, lastname):
    return f"Hello {firstname} {lastname}"


gcc = Client()
func_id = gcc.register_function(hello, function_name="hello")
task_id = gcc.run("Bob", "Smith", endpoint_id=ENDPOINT_ID, function_id=func_id)
while True:
    try:
        print(gcc.get_result(task_id))
        break
    except TaskPending:
        time.sleep(0.5)
print("status:", gcc.get_task(task_id)["status"])

with Executor(endpoint_id=ENDPOINT_ID, client=gcc) as gce:
    print(gce.submit_to_registered_function(func_id, kwargs={"firstname": "Ada",
                                                              "lastname": "Lovelace"}).result())
