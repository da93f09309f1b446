import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from processes import Stack  # noqa: E402


@pytest.fixture
def stack(tmp_path):
    """A director and two envoys (shards 1/2 and 2/2 of the CIFAR-10 subset) on loopback."""
    s = Stack(tmp_path)
    try:
        s.start()
        yield s
    except BaseException:
        print(s.logs())
        raise
    finally:
        s.stop()
