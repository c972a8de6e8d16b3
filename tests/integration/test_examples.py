"""The examples run against a real fabric and print what their docs say they print.

hello_world and monte_carlo_pi run as scripts, the way a user runs them; ml_in_the_loop
and thumbnails are called through ``main(argv)`` so the test can check the summary they
return. raw_amqp_client has its own tests in test_raw_amqp.py.
"""

from __future__ import annotations

import importlib.util
import math
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
from PIL import Image

from tests.fabric import Endpoint, Fabric

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def _run_script(fabric: Fabric, endpoint: Endpoint, name: str, *args: str) -> str:
    done = subprocess.run([sys.executable, str(EXAMPLES / name), *args],
                          env={**fabric.env, "GC_ENDPOINT_ID": endpoint.endpoint_id},
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    return done.stdout


def _load_example(name: str) -> ModuleType:
    """Load an example as a module without putting it in sys.modules.

    cloudpickle sends functions of modules it cannot find in sys.modules by value, as it
    does for ``__main__`` when the example runs as a script; the worker cannot import
    ``examples/`` either way.
    """
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def fabric_env(fabric: Fabric, monkeypatch: pytest.MonkeyPatch) -> Fabric:
    """Point in-process Executors (which read GC_* at construction) at the session's fabric."""
    monkeypatch.setenv("GC_BROKER_URL", fabric.broker_url)
    monkeypatch.setenv("GC_REGISTRY_URL", fabric.registry_url)
    monkeypatch.setenv("GC_HOME", str(fabric.home))
    return fabric


def test_hello_world_prints_the_remote_greeting(fabric: Fabric, endpoint: Endpoint) -> None:
    assert _run_script(fabric, endpoint, "hello_world.py").strip() == "Hello World!"


def test_monte_carlo_pi_estimates_pi(fabric: Fabric, endpoint: Endpoint) -> None:
    out = _run_script(fabric, endpoint, "monte_carlo_pi.py", "--tasks", "200")
    match = re.search(r"pi ~ ([0-9.]+) \+/- ([0-9.]+) from 400,000 darts in 200 tasks", out)
    assert match, out
    assert abs(float(match[1]) - math.pi) < 0.1
    assert 0 < float(match[2]) < 0.05


def test_ml_in_the_loop_beats_a_random_sample_within_its_budget(
        fabric_env: Fabric, endpoint: Endpoint, capsys: pytest.CaptureFixture[str]) -> None:
    example = _load_example("ml_in_the_loop")
    summary = example.main(["--endpoint", endpoint.endpoint_id, "--initial", "8", "--batch", "4",
                            "--budget", "32", "--candidates", "400", "--seed", "3"])
    # The budget is respected, and no candidate was simulated twice.
    assert summary["simulations"] == summary["distinct_candidates"] == 32
    assert summary["random_simulations"] == 32
    assert 1 <= summary["found_at"] <= 32
    # The best value is what the simulation really gives for that candidate ...
    candidates = example.make_candidates(400, 3)
    assert summary["best_value"] == example.simulate(candidates[summary["best_candidate"]].tolist())
    # ... and the model-guided search did at least as well as chance.
    assert summary["best_value"] >= summary["random_best_value"]
    assert "best candidate: #" in capsys.readouterr().out


def test_thumbnails_are_made_on_both_endpoints(
        fabric_env: Fabric, endpoint: Endpoint, make_endpoint: object, tmp_path: Path) -> None:
    second = make_endpoint()  # type: ignore[operator]
    second.start()
    summary = _load_example("thumbnails").main(
        ["--endpoint-a", endpoint.endpoint_id, "--endpoint-b", second.endpoint_id,
         "--images", "10", "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out")])

    thumbnails = sorted((tmp_path / "out").glob("*.png"))
    assert [p.stem for p in thumbnails] == [p.stem for p in sorted((tmp_path / "in").glob("*.jpg"))]
    assert len(thumbnails) == 10
    for path in thumbnails:
        with Image.open(path) as thumbnail:
            assert thumbnail.format == "PNG" and thumbnail.size == (128, 96)
    a, b = summary["endpoints"]["A"], summary["endpoints"]["B"]
    assert a["images"] == b["images"] == 5
    # Each endpoint's agent runs its own worker processes.
    assert a["workers"] and b["workers"] and not set(a["workers"]) & set(b["workers"])
