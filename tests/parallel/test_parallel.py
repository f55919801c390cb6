"""Multi-device tests (8 simulated CPU devices), each cases file in its own subprocess
(tests/parallel/_subproc.py says why)."""

from __future__ import annotations

import pytest

from _subproc import run_cases


@pytest.mark.parametrize("cases", ["cases_decode.py", "cases_sparse.py", "cases_loading.py"])
def test_cases_on_8_devices(cases):
    run_cases(cases)
