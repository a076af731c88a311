"""The XLA flags of every test process (pytest's own and the entry points it starts), so that runs compared with
each other compile alike.

LLVM at -O1 instead of XLA's default -O2 compiles the tests' many small programs about 30% faster (a small training
run's programs: 31 s -> 21 s on 2 cores) and runs them as fast; the entry points keep XLA's default when run
outside the tests.
"""

OPTIMIZATION = "--xla_backend_optimization_level=1"


def xla_flags(devices: int | None = 8) -> str:
    """XLA_FLAGS for a test process with `devices` fake CPU devices (None: the one real CPU device)."""
    return OPTIMIZATION if devices is None else f"--xla_force_host_platform_device_count={devices} {OPTIMIZATION}"
