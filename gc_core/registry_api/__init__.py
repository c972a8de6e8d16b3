"""The registry's HTTP contract: request and response bodies, and the client that speaks them.

Clients and agents depend on this package, never on the service (``gc_core.registry``): it
imports no web server, ORM or migrations, so a client-only install carries none of them.
"""

from gc_core.registry_api.client import RegistryClient

__all__ = ["RegistryClient"]
