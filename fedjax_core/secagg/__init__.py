"""Secure aggregation (SecAgg+): the director learns the sum of a round's updates, never one of them."""
