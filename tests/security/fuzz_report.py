"""Run the full fuzz and print the figures the README's security section quotes.

Runs ``tests/security/test_fuzz.py`` with the full message count and
``tests/integration/test_registry_api_fuzz.py`` with more examples per operation, in this
process (they need the local broker, as the suite does), then prints per target the
messages tried, crashes, wedged slots and lost tasks, and the registry API's request count.

    .venv/bin/python -m tests.security.fuzz_report --messages 12000 --seed 11
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest

#: Messages of the full run: enough that at least 10,000 reach the broker.
FULL_MESSAGES = 12_000
#: Registry API examples per operation and generation mode in the full run.
FULL_API_EXAMPLES = 200
#: The registry API fuzz, and the module attribute that counts its requests.
API_FUZZ = ("tests/integration/test_registry_api_fuzz.py",
            "tests.integration.test_registry_api_fuzz")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=FULL_MESSAGES)
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--api-examples", type=int, default=FULL_API_EXAMPLES)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch:
        report = Path(scratch) / "figures.json"
        os.environ.update(GC_FUZZ_MESSAGES=str(args.messages), GC_FUZZ_SEED=str(args.seed),
                          GC_FUZZ_REPORT=str(report), GC_FUZZ_API_EXAMPLES=str(args.api_examples))
        # No per-test timeout: the full run takes many minutes by design.
        code = pytest.main(["-q", "-p", "no:cacheprovider", "--timeout=0",
                            "tests/security/test_fuzz.py", API_FUZZ[0]])
        figures = json.loads(report.read_text()) if report.exists() else None
    print(_figures_text(figures, _api_requests()))
    return int(code)


def _api_requests() -> dict[str, int] | None:
    module = sys.modules.get(API_FUZZ[1])
    requests = getattr(module, "REQUESTS", None)
    return dict(requests) if requests is not None else None


def _figures_text(figures: dict[str, Any] | None, api: dict[str, int] | None) -> str:
    if figures is None:
        return "the fuzz test wrote no figures: it did not get as far as publishing"
    published, refused = figures["published"], figures["refused"]
    lines = [(f"Fuzz run, seed {figures['seed']}: {figures['generated']:,} messages generated "
              f"and published in {figures['publish_seconds']:.0f}s ({figures['seconds']:.0f}s "
              "with the wait to settle)"),
             "  target            tried  refused by broker  unencodable (skipped)"]
    lines += [(f"  {t:16} {published.get(t, 0) + refused.get(t, 0):6,}  "
               f"{refused.get(t, 0):17,}  {figures['unencodable'].get(t, 0):21,}")
              for t in sorted(set(published) | set(refused))]
    lines.append(f"  crashes: {sum(figures['crashes'].values())}")
    lines += [f"    {count} x {kind}" for kind, count in figures["crashes"].items()]
    lines.append(f"  wedged slots (messages left on a queue after the run): "
                 f"{figures['wedged'] or 'none'}")
    lines.append(f"  lost tasks: {len(figures['lost_tasks'])} of {figures['ordinary_tasks']} "
                 "ordinary tasks")
    lines.append(f"  agent RSS: {figures['rss_before'] / 2**20:.1f} -> "
                 f"{figures['rss_after'] / 2**20:.1f} MiB; reconnects: agent "
                 f"{figures['agent_reconnects']}, ledger {figures['ledger_reconnects']}")
    lines.append(f"Registry API fuzz (schemathesis): {sum(api.values()):,} requests {api}"
                 if api else "Registry API fuzz: no request count (test_registry_api_fuzz.py "
                             "has no REQUESTS counter)")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
