"""Shell commands on the endpoint: placeholders, return codes, a walltime, a dict result."""
import os

from gc_client.globus_compute import Executor, ShellFunction

ENDPOINT_ID = os.environ["ENDPOINT_ID"]

echo = ShellFunction("echo '{message}'")
failing = ShellFunction("ls /no/such/directory")
slow = ShellFunction("sleep 30", walltime=1)
as_dict = ShellFunction("printf 'one\\ntwo\\nthree\\n'", snippet_lines=2, return_dict=True)

with Executor(endpoint_id=ENDPOINT_ID) as gce:
    result = gce.submit(echo, message="hello from the shell").result()
    print(result.stdout.strip(), result.returncode)
    result = gce.submit(failing).result()
    print("ls failed:", result.returncode != 0, "No such file" in result.stderr)
    print("walltime:", gce.submit(slow).result().returncode)
    print("dict:", gce.submit(as_dict).result())
