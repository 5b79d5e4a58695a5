"""Golden regression: recompute every case of tests/golden/make_golden.py and compare it with
the committed tests/golden/<case>.npz (same keys, shapes, dtypes; values to rtol 1e-5).

A failure here means some number changed. If that is intended, regenerate the files with
`python tests/golden/make_golden.py` and say so in the commit; otherwise it is a regression.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

GOLDEN_DIR = Path(__file__).resolve().parent / "golden"


def _load_make_golden():
    spec = importlib.util.spec_from_file_location("make_golden", GOLDEN_DIR / "make_golden.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


make_golden = _load_make_golden()


def assert_matches_golden(actual: dict[str, np.ndarray], golden_path: Path) -> None:
    with np.load(golden_path) as golden_file:
        golden = {key: golden_file[key] for key in golden_file.files}
    not_computed, not_in_golden = sorted(set(golden) - set(actual)), sorted(set(actual) - set(golden))
    assert not not_computed and not not_in_golden, (
        f"keys differ from {golden_path.name}: {not_computed=} {not_in_golden=}"
    )
    for key, expected in golden.items():
        got = np.asarray(actual[key])
        assert got.shape == expected.shape, (key, got.shape, expected.shape)
        assert got.dtype == expected.dtype, (key, got.dtype, expected.dtype)
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6, err_msg=key)


@pytest.mark.parametrize("case", sorted(make_golden.CASES))
def test_matches_golden(case, tmp_path):
    make = make_golden.CASES[case]
    actual = make(tmp_path) if case == "cache" else make()
    assert actual, f"case {case} produced no arrays"
    assert_matches_golden(actual, GOLDEN_DIR / f"{case}.npz")


def test_every_golden_file_has_a_case():
    assert sorted(p.stem for p in GOLDEN_DIR.glob("*.npz")) == sorted(make_golden.CASES)
