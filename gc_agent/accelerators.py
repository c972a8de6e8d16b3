"""Pinning each worker to one accelerator (GPU) through the variables its runtime reads.

An engine given ``available_accelerators`` (a count, or the devices' ids) starts at most one
worker per device and shows each worker its own device only, the way Parsl's
HighThroughputExecutor and Globus Compute do: CUDA, ROCm/HIP and oneAPI Level Zero each read
their own variable, and all of them are set, so one config serves NVIDIA, AMD and Intel nodes.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BeforeValidator

__all__ = ["DEVICE_VARIABLES", "AcceleratorIds", "device_environment", "workers_for_devices"]

#: What each GPU runtime reads to know which devices a process may use.
DEVICE_VARIABLES = ("CUDA_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES",
                    "ZE_AFFINITY_MASK")
#: Most devices one node may list.
MAX_DEVICES = 1024


def _ids_from_count_or_list(value: object) -> object:
    """``4`` means the devices ``0``..``3``; a list names them (numbers become strings)."""
    if isinstance(value, bool):  # pydantic reports a ValueError, not a TypeError, as invalid
        raise ValueError("available_accelerators is a count or a list of device ids, "  # noqa: TRY004
                         "not a boolean")
    if isinstance(value, int):
        if not 0 <= value <= MAX_DEVICES:
            raise ValueError(f"available_accelerators {value} is not a device count between "
                             f"0 and {MAX_DEVICES}")
        return tuple(str(index) for index in range(value))
    if isinstance(value, (list, tuple)):
        ids = tuple(str(item) for item in value)
        if len(set(ids)) != len(ids) or not all(ids) or len(ids) > MAX_DEVICES:
            raise ValueError(f"available_accelerators {list(value)!r} must name at most "
                             f"{MAX_DEVICES} distinct, non-empty device ids")
        return ids
    return value


#: ``available_accelerators``: a device count or the devices' ids, kept as the ids.
AcceleratorIds = Annotated[tuple[str, ...], BeforeValidator(_ids_from_count_or_list)]


def device_environment(device: str) -> dict[str, str]:
    """The variables that show a worker ``device`` and no other."""
    return dict.fromkeys(DEVICE_VARIABLES, device)


def workers_for_devices(workers: int, devices: tuple[str, ...]) -> int:
    """Workers a node runs: one per device at most, when devices are listed."""
    return min(workers, len(devices)) if devices else workers
