"""Simulation: an experiment's rounds over virtual envoys in one process, with the code a federation runs."""
from fedjax_core.simulation.federation import SimulatedFederation

__all__ = ["SimulatedFederation"]
