"""Fixtures: small synthetic sessions with known betas/HRFs (generator in rt_mindeye.glm.synthetic)."""

from __future__ import annotations

import pytest

from rt_mindeye.glm.synthetic import SyntheticSession, make_session, median_correlation


@pytest.fixture(scope="session")
def synthetic_session() -> SyntheticSession:
    return make_session()


@pytest.fixture(scope="session")
def session_factory():
    return make_session


@pytest.fixture(scope="session")
def correlation():
    return median_correlation
