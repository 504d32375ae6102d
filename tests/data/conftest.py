"""Fixtures of the data tests."""

import pytest


@pytest.fixture(scope="module")
def photos():
  """Three real photos at pil_reference's 40 x 48 for the PIL parity tests: uint8 [3, H, W, 3]."""
  from support import pil_reference  # pylint: disable=import-outside-toplevel  (PIL, skimage)

  return pil_reference.photos()
