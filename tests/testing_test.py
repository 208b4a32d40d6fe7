"""The shared test helpers: the seed switch and the parametrize ids."""

import numpy as np
import pytest
import testing


@pytest.mark.parametrize(
  "value,want", [(None, 0), ("", 0), ("7", 7), (" 12 ", 12)], ids=["unset", "empty", "7", "spaces"]
)
def test_seed_values(value, want):
  assert testing._parse_seed(value) == want


def test_random_seed_is_an_int_and_bad_values_name_the_variable():
  assert 0 <= testing._parse_seed("random") < 2**32
  with pytest.raises(ValueError, match="JASP_TEST_SEED"):
    testing._parse_seed("abc")


def test_seed_is_fixed_for_the_run_and_fixture_agrees(seed):
  assert testing.seed() == seed == testing.seed()
  a, s = testing.fresh_rng()
  b, _ = testing.fresh_rng()
  assert s == seed
  np.testing.assert_array_equal(a.standard_normal(4), b.standard_normal(4))


def test_param_id():
  assert testing.param_id((16, 8)) == "16x8"
  assert testing.param_id(dict(shape=(8, 4), n=2)) == "shape=8x4,n=2"
  assert testing.param_id("x") is None
