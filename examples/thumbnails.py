"""Thumbnails on two endpoints through one interface: same function, two Executors.

The script draws ``--images`` pictures with Pillow (gradients and shapes) into ``--input``,
sends each picture's bytes to ``make_thumbnail`` on endpoint A or B in turn, writes the PNG
thumbnails it gets back to ``--output``, and prints per endpoint how many images it did,
how long it took and which worker processes (host:pid) ran them. The endpoints could be a
laptop and a cluster login node; the client code would not change.

Usage::

    python examples/thumbnails.py --endpoint-a EP_A --endpoint-b EP_B --output thumbs/
"""

from __future__ import annotations

import argparse
import os
import random
import tempfile
import time
from concurrent.futures import as_completed
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw
from tqdm import tqdm

from gc_client import Executor


def make_thumbnail(image_bytes: bytes, size: int) -> tuple[bytes, str]:
    """Shrink an image to fit ``size`` x ``size``; return the PNG bytes and the worker's host:pid."""
    import io
    import os
    import socket

    from PIL import Image

    with Image.open(io.BytesIO(image_bytes)) as image:
        image.thumbnail((size, size))
        out = io.BytesIO()
        image.save(out, format="PNG")
    return out.getvalue(), f"{socket.gethostname()}:{os.getpid()}"


def draw_image(path: Path, width: int, height: int, seed: int) -> None:
    """Draw a picture: a coloured linear or radial gradient with a few random shapes on it."""
    rng = random.Random(seed)
    kind = rng.choice([Image.linear_gradient, Image.radial_gradient])
    gradient = kind("L").rotate(rng.choice([0, 90, 180, 270])).resize((width, height))
    dark = tuple(rng.randrange(0, 128) for _ in range(3))
    light = tuple(rng.randrange(128, 256) for _ in range(3))
    image = Image.merge("RGB", [gradient.point(lambda v, lo=lo, hi=hi: lo + (hi - lo) * v // 255)
                                for lo, hi in zip(dark, light)])
    draw = ImageDraw.Draw(image)
    for _ in range(rng.randint(3, 8)):
        x, y = rng.randrange(width), rng.randrange(height)
        w, h = rng.randint(20, width // 3), rng.randint(20, height // 3)
        colour = tuple(rng.randrange(256) for _ in range(3))
        shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
        shape((x, y, x + w, y + h), fill=colour, outline=(0, 0, 0))
    image.save(path, format="JPEG", quality=90)


def prepare_inputs(folder: Path, count: int, width: int, height: int) -> list[Path]:
    """The folder's JPEGs; draw ``count`` of them first if it has none."""
    folder.mkdir(parents=True, exist_ok=True)
    if not any(folder.glob("*.jpg")):
        for i in range(count):
            draw_image(folder / f"image-{i:03d}.jpg", width, height, seed=i)
    return sorted(folder.glob("*.jpg"))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--endpoint-a", default=os.environ.get("GC_ENDPOINT_ID"),
                        help="first endpoint id [default: $GC_ENDPOINT_ID]")
    parser.add_argument("--endpoint-b", default=os.environ.get("GC_ENDPOINT_ID_B"),
                        help="second endpoint id [default: $GC_ENDPOINT_ID_B]")
    parser.add_argument("--input", type=Path,
                        help="folder of .jpg images; drawn here if it has none [default: a temp dir]")
    parser.add_argument("--output", type=Path, default=Path("thumbnails"),
                        help="where thumbnails go [default: ./thumbnails]")
    parser.add_argument("--images", type=int, default=20, help="images to draw")
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--size", type=int, default=128, help="thumbnails fit in SIZE x SIZE")
    args = parser.parse_args(argv)
    if not (args.endpoint_a and args.endpoint_b):
        parser.error("give --endpoint-a and --endpoint-b (or set GC_ENDPOINT_ID and "
                     "GC_ENDPOINT_ID_B); examples/README.md shows how to start a second endpoint")
    return args


def make_thumbnails(endpoints: dict[str, str], images: list[Path], output: Path,
                    size: int) -> dict[str, dict[str, Any]]:
    """Send the images to the endpoints in turn; write the thumbnails; return per-endpoint stats."""
    output.mkdir(parents=True, exist_ok=True)
    stats: dict[str, dict[str, Any]] = {
        label: {"endpoint_id": endpoint_id, "images": 0, "seconds": 0.0, "workers": set()}
        for label, endpoint_id in endpoints.items()}
    labels = list(endpoints)
    with ExitStack() as stack:
        executors = {label: stack.enter_context(Executor(endpoint_id=endpoint_id))
                     for label, endpoint_id in endpoints.items()}
        started = time.monotonic()
        futures = {}
        for i, path in enumerate(images):
            label = labels[i % len(labels)]  # round robin: A, B, A, B, ...
            futures[executors[label].submit(make_thumbnail, path.read_bytes(), size)] = (label, path)
        for future in tqdm(as_completed(futures), total=len(futures), desc="thumbnails", unit="img"):
            label, path = futures[future]
            png, worker = future.result()
            (output / f"{path.stem}.png").write_bytes(png)
            record = stats[label]
            record["images"] += 1
            record["seconds"] = time.monotonic() - started  # until its last thumbnail came back
            record["workers"].add(worker)
    for record in stats.values():
        record["workers"] = sorted(record["workers"])
    return stats


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Draw the images, make thumbnails on both endpoints, print and return the comparison."""
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="gc-thumbnails-") as scratch:
        images = prepare_inputs(args.input or Path(scratch), args.images, args.width, args.height)
        started = time.monotonic()
        stats = make_thumbnails({"A": args.endpoint_a, "B": args.endpoint_b}, images,
                                args.output, args.size)
        seconds = time.monotonic() - started

    print(f"{'endpoint':<40} {'images':>6} {'seconds':>8} {'workers':>7}  where")
    for label, record in stats.items():
        hosts = sorted({worker.split(":")[0] for worker in record["workers"]})
        print(f"{label} {record['endpoint_id']:<38} {record['images']:>6} "
              f"{record['seconds']:>8.2f} {len(record['workers']):>7}  {', '.join(hosts)}")
    print(f"{len(images)} thumbnails in {args.output}/ in {seconds:.2f}s")
    return {"endpoints": stats, "output": str(args.output), "images": len(images),
            "seconds": round(seconds, 2)}


if __name__ == "__main__":
    main()
