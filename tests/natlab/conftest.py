"""Fixtures for the NAT lab: `natlab` (one fresh lab per test) and `make_natlab` (several).

Without root, `ip` or `nft` the tests skip with the reason; with ZBUS_REQUIRE_NATLAB=1 they fail
instead (CI machines that must run them set it). Every test that uses a lab fixture gets the
`natlab` marker, so `-m "not natlab"` deselects them.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping

import pytest

from .lab import NatLab, cleanup_stale_namespaces, missing_requirements

REQUIRE_ENV = "ZBUS_REQUIRE_NATLAB"
LAB_FIXTURES = frozenset({"natlab", "make_natlab", "natlab_ready"})


def natlab_unavailable_outcome(reason: str, environ: Mapping[str, str]) -> tuple[str, str]:
    """("skip" | "fail", message) for a machine that cannot run the lab."""
    if environ.get(REQUIRE_ENV) == "1":
        return "fail", f"NAT lab required ({REQUIRE_ENV}=1) but unavailable: {reason}"
    return "skip", f"NAT lab unavailable: {reason} (set {REQUIRE_ENV}=1 to fail instead of skip)"


@pytest.fixture(scope="session")
def _natlab_session() -> Iterator[str | None]:
    """Once per session: why the lab cannot run (or None), and stale-namespace cleanup."""
    reason = missing_requirements()
    if reason is None:
        cleanup_stale_namespaces()
    yield reason
    if reason is None:
        cleanup_stale_namespaces()


@pytest.fixture
def natlab_ready(_natlab_session: str | None) -> None:
    """Skip (or fail, with ZBUS_REQUIRE_NATLAB=1) unless this machine can build labs."""
    if _natlab_session is not None:
        outcome, message = natlab_unavailable_outcome(_natlab_session, os.environ)
        if outcome == "fail":
            pytest.fail(message, pytrace=False)
        pytest.skip(message)


@pytest.fixture
def make_natlab(natlab_ready: None) -> Iterator[Callable[[], NatLab]]:
    """Factory: each call returns a new, unbuilt NatLab; all are torn down after the test."""
    labs: list[NatLab] = []

    def make() -> NatLab:
        lab = NatLab()
        labs.append(lab)
        return lab

    try:
        yield make
    finally:
        errors = []
        for lab in reversed(labs):
            try:
                lab.close()
            except Exception as error:  # close the others anyway, then report
                errors.append(error)
        if errors:
            raise errors[0]


@pytest.fixture
def natlab(make_natlab: Callable[[], NatLab]) -> NatLab:
    """A fresh, unbuilt NatLab: add routers and hosts, then `natlab.build()`. Torn down after."""
    return make_natlab()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if LAB_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.natlab)
