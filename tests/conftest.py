"""What every test gets: a fixed seed, and the backend in the report header.

The helpers the tests share (networks, data, numpy references) are in
`helpers.py`.
"""

import keras
import pytest


def pytest_report_header():
    return f"keras backend: {keras.backend.backend()}, keras {keras.__version__}"


@pytest.fixture(autouse=True)
def _seed():
    keras.utils.set_random_seed(0)
