"""Where worker pools reach the interchange: an address, or a rule to find it at start.

A config written on one login node may run on another, so an address can be named by how to
find it (the address of an interface, of the host name, of the route out) and is looked up
only when the engine starts, with Parsl's own helpers.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from gc_core.errors import ConfigError

__all__ = ["AddressLookup", "resolve_address"]


class AddressLookup(BaseModel):
    """How to find this host's address for the workers when the engine starts."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: Literal["address_by_interface", "address_by_hostname", "address_by_route"]
    ifname: str | None = Field(default=None, description="The network interface, e.g. ib0 "
                                                         "(address_by_interface only).")

    @model_validator(mode="after")
    def _interface_named_when_needed(self) -> AddressLookup:
        if (self.type == "address_by_interface") != (self.ifname is not None):
            raise ValueError("ifname is required with type address_by_interface and allowed "
                             "with it only")
        return self


def resolve_address(address: str | AddressLookup) -> str:
    """The address itself, or the one ``address`` says how to find on this host.

    Raises:
        ConfigError: the interface does not exist or has no IPv4 address, or the host name
            or route gives none.
    """
    if isinstance(address, str):
        return address
    from parsl import addresses

    try:
        if address.ifname is not None:  # address_by_interface: the only type with an ifname
            return addresses.address_by_interface(address.ifname)
        if address.type == "address_by_hostname":
            return addresses.address_by_hostname()
        return addresses.address_by_route()
    except OSError as exc:
        where = f"interface {address.ifname!r}" if address.ifname else address.type
        raise ConfigError(f"engine.address: cannot find this host's address by {where}: {exc}; "
                          "name an existing interface (`ip addr` lists them) or give the "
                          "address itself") from exc
