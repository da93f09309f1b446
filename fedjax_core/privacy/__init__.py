"""Differential privacy of a federation's updates: the notebook's settings, the director's clipped and
noised average (central DP), the envoys' clipping and noise (local DP), and the privacy accountant.
See docs/privacy.md."""
from fedjax_core.privacy.settings import CentralDP, LocalDP, SecureAggregation

__all__ = ["CentralDP", "LocalDP", "SecureAggregation"]
