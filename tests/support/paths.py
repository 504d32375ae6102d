"""Where the repository and the real-photo archive are."""

import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CIFAR10_JPEG = os.environ.get("JAXSAM_CIFAR10_JPEG") or os.path.join(
  ROOT, "..", "shared", "data", "cifar10-jpeg.tar.gz"
)
needs_archive = pytest.mark.skipif(
  not os.path.isfile(CIFAR10_JPEG),
  reason=f"the CIFAR-10 JPEG archive is absent "
  f"({CIFAR10_JPEG}; set JAXSAM_CIFAR10_JPEG to its path)",
)
