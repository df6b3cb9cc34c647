"""The fault suite's summary: after the run, one JSON line with every case tried, whether the
service survived it, and what was lost (rows, submissions), e.g.

    {"tried": 68, "survived": 68, "lost": 0, "failed": [], "skipped": [], "tests": {...}}

A test is a case; it survives when it passes. A test adds what it measured with the `fault`
fixture: `fault(lost=0, rows=8)`; `lost` is summed across cases.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest

_CASES: dict[str, dict[str, Any]] = {}


@pytest.fixture
def fault(request: pytest.FixtureRequest) -> Callable[..., None]:
    """Record measurements of this fault case: fault(lost=0, retries=6, ...)."""
    case = _CASES.setdefault(request.node.nodeid, {})

    def record(**values: Any) -> None:
        case.update(values)

    return record


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if "tests/faults/" not in report.nodeid.replace("\\", "/"):
        return
    case = _CASES.setdefault(report.nodeid, {})
    if report.when == "call" or report.failed or report.skipped:
        if report.skipped:
            case["outcome"] = "skipped"
        elif case.get("outcome") != "failed":
            case["outcome"] = "survived" if report.passed else "failed"


def summary() -> dict[str, Any]:
    """Totals, then each test function: its cases (one per parameter set) and what they measured."""
    cases = {k: v for k, v in _CASES.items() if "outcome" in v}
    tried = {k: v for k, v in cases.items() if v["outcome"] != "skipped"}
    by_test: dict[str, dict[str, Any]] = {}
    for nodeid, case in cases.items():
        name = nodeid.split("::", 1)[-1]
        test, _, param = name.partition("[")
        entry = by_test.setdefault(test, {"tried": 0, "survived": 0, "lost": 0})
        if case["outcome"] == "skipped":
            entry["skipped"] = entry.get("skipped", 0) + 1
            continue
        entry["tried"] += 1
        entry["survived"] += case["outcome"] == "survived"
        entry["lost"] += int(case.get("lost", 0))
        measured = {k: v for k, v in case.items() if k not in ("outcome", "lost")}
        if measured:
            entry.setdefault("measured", {})[param.rstrip("]") or "-"] = measured
    return {
        "tried": len(tried),
        "survived": sum(v["outcome"] == "survived" for v in tried.values()),
        "lost": sum(int(v.get("lost", 0)) for v in tried.values()),
        "failed": sorted(k for k, v in tried.items() if v["outcome"] == "failed"),
        "skipped": sorted(k for k, v in cases.items() if v["outcome"] == "skipped"),
        "tests": by_test,
    }


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if any("outcome" in v for v in _CASES.values()):
        terminalreporter.write_sep("=", "charter fault summary")
        terminalreporter.write_line(json.dumps(summary(), indent=1))
