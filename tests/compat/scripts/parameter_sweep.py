"""A sweep: one task per parameter, results as they complete, then an ordered map."""
import os
from concurrent.futures import as_completed

from gc_client.globus_compute import Executor

ENDPOINT_ID = os.environ["ENDPOINT_ID"]


def area_of_circle(radius):
    import math
    return round(math.pi * radius ** 2, 3)


radii = [1, 2, 3, 4, 5, 6, 7, 8]
with Executor(endpoint_id=ENDPOINT_ID) as gce:
    futures = {gce.submit(area_of_circle, r): r for r in radii}
    areas = {}
    for future in as_completed(futures):
        areas[futures[future]] = future.result()
    for r in radii:
        print(f"radius {r}: area {areas[r]}")
    print("squares:", list(gce.map(pow, range(5), [2] * 5)))
