"""The device mesh and the one table that maps logical axis names to mesh axes.

The model names its parameter axes ('embed', 'mlp', 'heads', ...); the config's
`sharding.logical_axis_rules` says which mesh axis (if any) each is split over. 'batch' is the
example axis of every input: split over all batch-parallel mesh axes (data and fsdp).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp")


def mesh_shape(config: ml_collections.ConfigDict, num_devices: int) -> tuple[int, int]:
  data, fsdp = int(config.sharding.data), int(config.sharding.fsdp)
  if fsdp < 1:
    raise ValueError(f"config.sharding.fsdp={fsdp} must be >= 1")
  if data == -1:
    if num_devices % fsdp:
      raise ValueError(f"config.sharding.fsdp={fsdp} does not divide the {num_devices} devices")
    data = num_devices // fsdp
  if data * fsdp != num_devices:
    raise ValueError(f"config.sharding: data={data} x fsdp={fsdp} != {num_devices} devices")
  return data, fsdp


def make_mesh(config: ml_collections.ConfigDict,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A (data, fsdp) mesh; Auto axes, so jit propagates shardings from the annotated inputs."""
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(config, len(devices))
  if len(devices) == len(jax.devices()):
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * 2, devices=devices)
  # A subset (tests compare 1 device against 8): lay the given devices out in order.
  return Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=(AxisType.Auto,) * 2)


def logical_rules(config: ml_collections.ConfigDict) -> tuple[tuple[str, Any], ...]:
  return tuple((name, tuple(axes) if isinstance(axes, list) else axes)
               for name, axes in config.sharding.logical_axis_rules)


def batch_axes(config: ml_collections.ConfigDict) -> Any:
  """The mesh axes the example axis is split over (what the loss gathers across)."""
  axes = dict(logical_rules(config)).get("batch")
  if axes is None:
    raise ValueError("config.sharding.logical_axis_rules needs a rule for 'batch'")
  return axes


def batch_sharding(mesh: Mesh, config: ml_collections.ConfigDict, ndim: int) -> NamedSharding:
  return NamedSharding(mesh, P(batch_axes(config), *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def logical_shardings(boxed_tree: Any, mesh: Mesh, config: ml_collections.ConfigDict) -> Any:
  """NamedShardings for a tree whose leaves carry logical names (nn.LogicallyPartitioned)."""
  specs = nn.get_partition_spec(boxed_tree)
  return nn.logical_to_mesh_sharding(specs, mesh, logical_rules(config))


def num_batch_shards(config: ml_collections.ConfigDict, mesh: Mesh) -> int:
  """How many pieces the example axis is cut into (devices along the batch axes)."""
  axes = batch_axes(config)
  axes = (axes,) if isinstance(axes, str) else tuple(axes)
  return int(np.prod([mesh.shape[a] for a in axes]))


def batch_size_per_device(config: ml_collections.ConfigDict, mesh: Mesh) -> int:
  shards = num_batch_shards(config, mesh)
  if config.batch_size % shards:
    raise ValueError(f"config.batch_size={config.batch_size} is not divisible by the "
                     f"{shards} batch shards of the mesh {dict(mesh.shape)}")
  return config.batch_size // shards
