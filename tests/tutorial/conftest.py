"""Make the tutorial's `envoy/` folder importable, as the envoy itself does at start-up."""

import sys
from pathlib import Path

ENVOY_DIR = Path(__file__).resolve().parents[2] / "envoy"
if str(ENVOY_DIR) not in sys.path:
    sys.path.insert(0, str(ENVOY_DIR))
