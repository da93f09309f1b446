"""What the envoy's worker runs and the notebook shares: the interfaces a bundle carries, the task
contract and running a task, model state <-> tensors. Imports nothing from ``fedjax_core.api``, so a
worker unpickling a bundle loads only this package (tests/runtime/test_layering.py checks it)."""
