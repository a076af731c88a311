"""Meshes from the config, logical-axis rules, and global arrays assembled from per-host data."""

import math
from collections.abc import Sequence

import flax.linen as nn
import jax
import numpy as np
import optax
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

# Logical names used by rdlm's modules (rdlm/model/layers.py and transformer.py).
PARAM_AXES = ("vocab", "embed", "heads", "head_dim", "qkv", "mlp", "gate_up", "adapter", "norm", "layers")
ACTIVATION_AXES = ("activation_batch", "activation_length", "activation_embed", "activation_mlp")
BATCH_AXIS = "activation_batch"
AXIS_NAMES = ("data", "fsdp", "tensor")
# Logical axis -> mesh axes: FSDP over `fsdp` (and batch over data x fsdp), tensor parallelism over `tensor`.
DEFAULT_RULES = (
    ("activation_batch", ("data", "fsdp")),
    ("activation_length", None),
    ("activation_embed", None),
    ("activation_mlp", "tensor"),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("head_dim", None),
    ("qkv", None),
    ("mlp", "tensor"),
    ("gate_up", None),
    ("adapter", "tensor"),
    ("norm", None),
    ("layers", None),
)


def resolve_shape(shape: Sequence[int], num_devices: int, field: str = "mesh.shape") -> tuple[int, ...]:
    """The mesh shape with its one -1 filled in; an error naming the values if it cannot fit."""
    shape = tuple(int(s) for s in shape)
    if shape.count(-1) > 1 or any(s == 0 or s < -1 for s in shape):
        raise ValueError(f"{field}={shape} may hold at most one -1 and otherwise positive sizes.")
    known = math.prod(s for s in shape if s != -1)
    if -1 in shape:
        if num_devices % known:
            raise ValueError(f"{field}={shape} cannot be filled: {num_devices} devices are not a multiple of {known}.")
        shape = tuple(num_devices // known if s == -1 else s for s in shape)
    if math.prod(shape) != num_devices:
        raise ValueError(
            f"{field}={shape} has {math.prod(shape)} devices but {num_devices} are present; "
            "make the product match or use -1 for one axis."
        )
    return shape


def make_mesh(mesh_config, devices=None) -> Mesh:
    """A mesh of `mesh.shape` over `mesh.axis_names`; with `mesh.dcn_shape` != 1s a hybrid ICI x DCN mesh.

    Axes are `AxisType.Auto`: linen layers need GSPMD-style propagation.
    """
    devices = list(jax.devices() if devices is None else devices)
    names = tuple(mesh_config.axis_names)
    if len(mesh_config.shape) != len(names):
        raise ValueError(f"mesh.shape={tuple(mesh_config.shape)} needs one size per axis of {names}.")
    dcn = tuple(int(s) for s in getattr(mesh_config, "dcn_shape", (1,) * len(names)))
    num_slices = math.prod(dcn)
    if len(devices) % num_slices:
        raise ValueError(f"mesh.dcn_shape={dcn} asks for {num_slices} slices; {len(devices)} devices do not split so.")
    ici = resolve_shape(mesh_config.shape, len(devices) // num_slices)
    if num_slices > 1:
        array = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices=devices)
    else:
        try:
            array = mesh_utils.create_device_mesh(ici, devices=devices)
        except (AssertionError, NotImplementedError, ValueError):
            array = np.asarray(devices).reshape(ici)
    return Mesh(array, names, axis_types=(AxisType.Auto,) * len(names))


def check_rules(rules, mesh: Mesh) -> tuple:
    """Rules as a tuple of pairs, checked: known logical names, mesh axes that exist."""
    rules = tuple((str(name), tuple(axes) if isinstance(axes, (list, tuple)) else axes) for name, axes in rules)
    known = set(PARAM_AXES) | set(ACTIVATION_AXES)
    for name, axes in rules:
        if name not in known:
            raise ValueError(f"mesh.rules names the logical axis {name!r}, which no layer uses; known: {sorted(known)}.")
        for axis in (axes if isinstance(axes, tuple) else (axes,)):
            if axis is not None and axis not in mesh.axis_names:
                raise ValueError(f"mesh.rules maps {name!r} to mesh axis {axis!r}; the mesh has {mesh.axis_names}.")
    missing = [n for n in PARAM_AXES + ACTIVATION_AXES if n not in dict(rules)]
    if missing:
        raise ValueError(f"mesh.rules has no rule for the logical axes {missing}; map them (None = replicated).")
    return rules


def logical_shardings(abstract_boxed, mesh: Mesh, rules) -> object:
    """NamedShardings for a tree whose leaves may be LogicallyPartitioned (others are replicated)."""
    # The optimizer state of frozen parameters (optim.freeze) is optax.MaskedNode, an empty tuple (possibly in a
    # box) that flax would take for a logical spec; it stays as it is (nothing to place).
    masked = lambda x: isinstance(x, optax.MaskedNode)  # noqa: E731
    abstract_boxed = jax.tree.map(
        lambda x: x.value if isinstance(x, nn.meta.AxisMetadata) and masked(x.value) else x, abstract_boxed,
        is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))
    specs = nn.get_partition_spec(abstract_boxed)
    return jax.tree.map(lambda x: x if masked(x) else nn.logical_to_mesh_sharding(x, mesh, rules), specs,
                        is_leaf=lambda x: masked(x) or isinstance(x, P))


def check_divisible(abstract, shardings) -> None:
    """Each sharded dimension must split evenly over its mesh axes (jit rejects uneven inputs)."""

    def check(path, x, s):
        for dim, axes in zip(x.shape, s.spec):
            names = (axes,) if isinstance(axes, str) else tuple(axes or ())
            ways = math.prod(s.mesh.shape[a] for a in names)
            if dim % ways:
                name = "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)
                raise ValueError(
                    f"{name} {x.shape} has a dimension of {dim} that does not split {ways} ways over mesh axes "
                    f"{names}; choose a mesh whose axis sizes divide it."
                )

    jax.tree_util.tree_map_with_path(check, abstract, shardings)


def data_axes(rules) -> tuple[str, ...]:
    """The mesh axes the batch dimension is split over."""
    axes = dict(rules)[BATCH_AXIS]
    if axes is None:
        return ()
    return tuple(axes) if isinstance(axes, tuple) else (axes,)


def batch_sharding(mesh: Mesh, rules, leading_dims: int = 0) -> NamedSharding:
    """Sharding of a [..., B, S] batch array: B over the data axes, `leading_dims` unsharded dims first."""
    axes = data_axes(rules)
    return NamedSharding(mesh, P(*([None] * leading_dims), axes or None))


def check_batch(global_batch: int, mesh: Mesh, rules, field: str = "train.batch_size") -> None:
    """The global batch must split evenly over the data axes and over the processes."""
    axes = data_axes(rules)
    ways = math.prod(mesh.shape[a] for a in axes)
    if global_batch % ways:
        raise ValueError(
            f"{field}={global_batch} does not divide over the data axes {axes} of the mesh ({ways} ways); "
            f"use a multiple of {ways}."
        )
    if global_batch % jax.process_count():
        raise ValueError(f"{field}={global_batch} does not divide over {jax.process_count()} processes.")


def global_batch(local: dict, sharding: NamedSharding, global_rows: int, batch_dim: int = 0) -> dict:
    """Global jax Arrays from this process's rows (`jax.make_array_from_process_local_data`)."""

    def make(x):
        shape = list(x.shape)
        shape[batch_dim] = global_rows
        return jax.make_array_from_process_local_data(sharding, x, tuple(shape))

    return jax.tree.map(make, local)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())
