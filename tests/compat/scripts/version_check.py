"""Check versions before anything else, as careful scripts do."""
from gc_client.globus_compute import Client, VersionMismatch

gcc = Client(do_version_check=False)
gcc.version_check()
print("version check passed")
try:
    gcc.version_check(endpoint_version="0.0.1")
except VersionMismatch as error:
    print("old endpoint refused:", type(error).__name__)
