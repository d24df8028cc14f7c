"""Probe: can this JAX run one mesh over 2 local CPU processes (``jax.distributed`` + gloo)
and a shard_map'd jitted step whose output is replicated (XLA's all-gather over gloo)?

    for i in 0 1; do python scripts/probe_multiprocess_cpu.py $i 12355 2 & done; wait

Each process prints the global devices and the replicated output; on JAX 0.10.2 (CPU) both
print the same 4 x 2 values.
"""

import sys

import jax

pid, port, ndev = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
jax.config.update("jax_num_cpu_devices", ndev)
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=pid)
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

mesh = Mesh(np.array(jax.devices()), ("w",))
sharded, replicated = NamedSharding(mesh, P("w")), NamedSharding(mesh, P())
local = [jax.device_put(np.full(2, float(d.id), np.float32), d) for d in jax.local_devices()]
x = jax.make_array_from_single_device_arrays((2 * len(jax.devices()),), sharded, local)
body = lambda s: (s + 1, (s * 10).astype(jnp.int32))
f = jax.shard_map(body, mesh=mesh, in_specs=P("w"), out_specs=(P("w"), P("w")), check_vma=False)
step = jax.jit(f, out_shardings=(sharded, replicated), donate_argnums=0)
for _ in range(5):
    x, tokens = step(x)
print(pid, jax.devices(), np.asarray(tokens), tokens.is_fully_replicated, flush=True)
jax.distributed.shutdown()
