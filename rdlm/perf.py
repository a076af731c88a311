"""The machine's measured peak: a large float32 matmul, timed in this process."""

import time

import jax
import jax.numpy as jnp
from jax.sharding import AxisType


def measure_peak_tflops(size: int = 2048, repeats: int = 5) -> float:
    """Achieved TFLOP/s of one device on a size x size float32 matmul (best of `repeats`)."""
    device = jax.local_devices()[0]
    # A one-device mesh of its own: under the training mesh's context, jit would reject the
    # single-device operand (and the measurement is of one device).
    with jax.set_mesh(jax.make_mesh((1,), ("device",), devices=[device], axis_types=(AxisType.Auto,))):
        a = jax.device_put(jax.random.normal(jax.random.key(0), (size, size), jnp.float32), device)
        matmul = jax.jit(lambda x: x @ x)
        matmul(a).block_until_ready()
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            matmul(a).block_until_ready()
            best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e12
