"""jasp._shapes: splitting a reshape into runs of equal products."""

from jasp import _shapes


def test_reshape_runs():
  assert _shapes.reshape_runs((8, 2, 4), (8, 8)) == [((0,), (0,)), ((1, 2), (1,))]
  assert _shapes.reshape_runs((64,), (16, 4)) == [((0,), (0, 1))]
  assert _shapes.reshape_runs((1, 6), (6, 1)) == [((0,), ()), ((1,), (0,)), ((), (1,))]
  assert _shapes.reshape_runs((6, 4), (4, 6)) == [((0, 1), (0, 1))]
  assert _shapes.reshape_runs((3, 5), (4,)) is None
