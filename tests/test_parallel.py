"""fedjax_core.parallel on 2 forced CPU devices (a fresh process: the device count is fixed at JAX's start)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

CHECK = textwrap.dedent('''
    import json
    import jax, jax.numpy as jnp, numpy as np, optax
    from flax import linen as nn
    from flax.training import train_state
    from fedjax_core.parallel import envoy_mesh, replicate, shard_batch
    from fedjax_core.runtime.model_tensors import state_to_tensors, tensors_to_state, canonicalize

    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(10)(nn.relu(nn.Dense(32)(x)))

    model = MLP()
    params = model.init(jax.random.PRNGKey(0), jnp.ones((1, 16)))["params"]
    state0 = train_state.TrainState.create(apply_fn=model.apply, params=params, tx=optax.sgd(0.1, 0.9))

    @jax.jit
    def step(state, x, y):  # the user's step, unchanged between the two runs
        def loss(p):
            return optax.softmax_cross_entropy_with_integer_labels(state.apply_fn({"params": p}, x), y).mean()
        return state.apply_gradients(grads=jax.grad(loss)(state.params))

    rng = np.random.default_rng(0)
    batches = [(rng.standard_normal((64, 16)).astype(np.float32), rng.integers(0, 10, 64)) for _ in range(5)]
    single = state0
    for x, y in batches:
        single = step(single, x, y)

    mesh = envoy_mesh()
    parallel = replicate(state0, mesh)
    shard_counts = []
    for x, y in batches:
        xs, ys = shard_batch((x, y), mesh)
        shard_counts.append([s.data.shape[0] for s in xs.addressable_shards])
        parallel = step(parallel, xs, ys)
    diff = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
               for a, b in zip(jax.tree_util.tree_leaves(single.params), jax.tree_util.tree_leaves(parallel.params)))
    kernel = parallel.params["Dense_0"]["kernel"]

    template = canonicalize(replicate(state0, mesh))
    restored = tensors_to_state(template, state_to_tensors(parallel))
    restored_devices = len(restored.params["Dense_0"]["kernel"].sharding.device_set)
    try:
        shard_batch(np.ones((3, 16)), mesh)
        odd = "accepted"
    except ValueError as exc:
        odd = str(exc)
    print(json.dumps({"devices": len(jax.devices()), "mesh": list(mesh.axis_names), "shards": shard_counts,
                      "param_devices": len(kernel.sharding.device_set), "max_diff": diff,
                      "restored_devices": restored_devices, "odd": odd}))
''')


def run_check(devices: int) -> dict:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
    proc = subprocess.run([sys.executable, "-c", CHECK], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_two_devices_split_the_batch_and_match_one_device():
    out = run_check(2)
    assert out["devices"] == 2 and out["mesh"] == ["data"]
    assert out["shards"] == [[32, 32]] * 5  # each device saw half of every batch
    assert out["param_devices"] == 2  # the state stayed replicated through the steps
    assert out["max_diff"] < 1e-5  # the same training as on one device, within float tolerance
    assert out["restored_devices"] == 2  # a model restored from the wire keeps the template's sharding
    assert "cannot be split across 2 devices" in out["odd"]
