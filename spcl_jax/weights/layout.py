"""JAX encoder parameters -> timm's `VisionTransformer` state dict, as numpy arrays (no torch).

Keys and layouts (docs/method.md §8):

  patch_embed.proj.weight (D, C, P, P)  <- embedding/kernel (P, P, C, D), transposed
  cls_token (1, 1, D)                   <- cls
  pos_embed (1, 1 + N, D)               <- the fixed sin-cos table, with a zero CLS row
  blocks.{i}.attn.qkv.weight (3D, D)    <- query, key, value kernels (D, H, Dh), stacked
  blocks.{i}.attn.proj.weight (D, D)    <- out kernel (H, Dh, D)
  blocks.{i}.norm1/norm2, mlp.fc1/fc2   <- LayerNorm_0/1, MlpBlock_0/Dense_0/1 (kernels transposed)
  norm                                  <- Transformer/encoder_norm

Medical MAE's ViT is timm's with the same keys, so both formats use this one mapping, and
importing (`spcl_jax/weights/importing.py`) runs the same table backwards (`params_from_timm`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax
import numpy as np

from spcl_jax.models.vit import sincos_2d_posemb

SUPPORTED_IN_CHANS = (1, 3)


def check_in_chans(trained_channels: int, in_chans: int) -> None:
  """An export may keep the trained channel count, or widen a 1-channel model to 3 channels."""
  if in_chans not in SUPPORTED_IN_CHANS:
    raise ValueError(f"--in-chans {in_chans}: expected one of {SUPPORTED_IN_CHANS}")
  if in_chans != trained_channels and trained_channels != 1:
    raise ValueError(
        f"--in-chans {in_chans}: the model was pre-trained on {trained_channels} channels "
        "(config.json model.channels); only a 1-channel model can be widened to 3")


def spread_over_channels(kernel: np.ndarray, in_chans: int) -> np.ndarray:
  """(P, P, C, D) -> (P, P, in_chans, D), each new channel carrying kernel / in_chans.

  A grayscale image copied to every channel then gives exactly the trained activations
  (sum over channels of x * W / in_chans = x * W). Repeating W unchanged, as timm's loaders do
  for a 1-channel source, silently multiplies the patch embedding by in_chans.
  """
  channels = kernel.shape[2]
  if channels == in_chans:
    return kernel
  if channels != 1:
    raise ValueError(f"cannot spread a {channels}-channel patch kernel over {in_chans} channels")
  return np.repeat(kernel / np.float32(in_chans), in_chans, axis=2).astype(kernel.dtype)


def pos_embed_with_cls_row(grid_size: int, width: int) -> np.ndarray:
  """(1, 1 + N, D): the sin-cos table that pre-training adds, with a zero row for CLS.

  The CLS token gets no position in pre-training; a zero row makes timm's `x + pos_embed`
  add nothing to it.
  """
  table = sincos_2d_posemb(grid_size, width)
  return np.concatenate([np.zeros((1, width), np.float32), table], axis=0)[None]


# --- the one table: timm key <-> our parameter path(s), and how the array changes ----------------
#
# Kinds (the first layout is ours, the second timm's):
#   copy         same array                      (biases, LayerNorm, CLS)
#   linear       Dense kernel (in, out) <-> torch Linear weight (out, in)
#   patch        conv kernel (P, P, C, D) <-> (D, C, P, P)
#   qkv_kernel   query, key, value kernels (D, H, Dh) <-> one (3D, D) weight. Flattening (H, Dh)
#                gives output feature h * Dh + dh, the order in which timm splits qkv into heads.
#   qkv_bias     query, key, value biases (H, Dh) <-> one (3D,) bias
#   out_kernel   out kernel (H, Dh, D), input feature h * Dh + dh <-> proj weight (D, D)


@dataclasses.dataclass(frozen=True)
class Entry:
  timm_key: str
  paths: tuple[str, ...]  # '/'-joined paths in our parameter tree
  kind: str


def _block_entries(i: int) -> list[Entry]:
  t, o = f"blocks.{i}", f"Transformer/encoderblock_{i}"
  attn = f"{o}/MultiHeadDotProductAttention_0"
  entries = [
      Entry(f"{t}.norm1.weight", (f"{o}/LayerNorm_0/scale",), "copy"),
      Entry(f"{t}.norm1.bias", (f"{o}/LayerNorm_0/bias",), "copy"),
      Entry(f"{t}.attn.qkv.weight", tuple(f"{attn}/{n}/kernel" for n in QKV), "qkv_kernel"),
      Entry(f"{t}.attn.qkv.bias", tuple(f"{attn}/{n}/bias" for n in QKV), "qkv_bias"),
      Entry(f"{t}.attn.proj.weight", (f"{attn}/out/kernel",), "out_kernel"),
      Entry(f"{t}.attn.proj.bias", (f"{attn}/out/bias",), "copy"),
      Entry(f"{t}.norm2.weight", (f"{o}/LayerNorm_1/scale",), "copy"),
      Entry(f"{t}.norm2.bias", (f"{o}/LayerNorm_1/bias",), "copy"),
  ]
  for j in (0, 1):
    dense = f"{o}/MlpBlock_0/Dense_{j}"
    entries += [Entry(f"{t}.mlp.fc{j + 1}.weight", (f"{dense}/kernel",), "linear"),
                Entry(f"{t}.mlp.fc{j + 1}.bias", (f"{dense}/bias",), "copy")]
  return entries


QKV = ("query", "key", "value")


def encoder_table(depth: int, final_norm: bool = True) -> list[Entry]:
  """Every encoder parameter of a depth-`depth` ViT (`final_norm=False`: without the final
  LayerNorm, as in a classifier pooled through fc_norm, where timm has no `norm`). pos_embed is
  not in it: in this project positions are a fixed table, not a parameter (see
  `pos_embed_with_cls_row`)."""
  table = [Entry("cls_token", ("cls",), "copy"),
           Entry("patch_embed.proj.weight", ("embedding/kernel",), "patch"),
           Entry("patch_embed.proj.bias", ("embedding/bias",), "copy")]
  for i in range(depth):
    table += _block_entries(i)
  if final_norm:
    table += [Entry("norm.weight", ("Transformer/encoder_norm/scale",), "copy"),
              Entry("norm.bias", ("Transformer/encoder_norm/bias",), "copy")]
  return table


def to_timm(kind: str, arrays: list[np.ndarray]) -> np.ndarray:
  """Our array(s) of one table entry -> timm's array."""
  if kind == "copy":
    return arrays[0]
  if kind == "linear":
    return arrays[0].T
  if kind == "patch":
    return arrays[0].transpose(3, 2, 0, 1)
  if kind == "qkv_kernel":
    return np.concatenate([a.reshape(a.shape[0], -1).T for a in arrays], axis=0)
  if kind == "qkv_bias":
    return np.concatenate([a.reshape(-1) for a in arrays], axis=0)
  if kind == "out_kernel":
    return arrays[0].reshape(-1, arrays[0].shape[-1]).T
  raise KeyError(f"unknown layout kind {kind!r}")


def from_timm(kind: str, array: np.ndarray, num_heads: int) -> list[np.ndarray]:
  """timm's array of one table entry -> our array(s): `to_timm` run backwards."""
  if kind == "copy":
    return [array]
  if kind == "linear":
    return [array.T]
  if kind == "patch":
    return [array.transpose(2, 3, 1, 0)]
  if kind == "qkv_kernel":
    width = array.shape[1]
    return [part.T.reshape(width, num_heads, -1) for part in np.split(array, 3, axis=0)]
  if kind == "qkv_bias":
    return [part.reshape(num_heads, -1) for part in np.split(array, 3, axis=0)]
  if kind == "out_kernel":
    return [array.T.reshape(num_heads, -1, array.shape[0])]
  raise KeyError(f"unknown layout kind {kind!r}")


def num_blocks(params: dict[str, Any]) -> int:
  blocks = [k for k in params["Transformer"] if k.startswith("encoderblock_")]
  # Blocks must be numbered 0..depth-1 without gaps, or the exported depth would be wrong.
  expected = {f"encoderblock_{i}" for i in range(len(blocks))}
  if set(blocks) != expected:
    raise ValueError(f"encoder blocks are not numbered 0..{len(blocks) - 1}: {sorted(blocks)}")
  return len(blocks)


def timm_state_dict(params: dict[str, Any], grid_size: int, in_chans: int
                    ) -> dict[str, np.ndarray]:
  """The encoder's parameters as timm `VisionTransformer(num_classes=0)` arrays, float32."""
  flat = {k: np.asarray(v) for k, v in
          flax.traverse_util.flatten_dict(params, sep="/").items()}
  flat["embedding/kernel"] = spread_over_channels(flat["embedding/kernel"], in_chans)
  # A classifier pooled with fc_norm has no final norm (timm's `norm` is then the identity).
  final_norm = "encoder_norm" in params["Transformer"]
  state = {entry.timm_key: to_timm(entry.kind, [flat[p] for p in entry.paths])
           for entry in encoder_table(num_blocks(params), final_norm)}
  state["pos_embed"] = pos_embed_with_cls_row(grid_size, flat["embedding/kernel"].shape[-1])
  # Contiguous float32: safetensors refuses strided views, torch.load keeps whatever it gets.
  return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in state.items()}


def params_from_timm(state: dict[str, np.ndarray], depth: int, num_heads: int
                     ) -> dict[str, Any]:
  """Our nested encoder parameters from a timm state dict holding every `encoder_table` key."""
  flat = {}
  for entry in encoder_table(depth):
    for path, array in zip(entry.paths,
                           from_timm(entry.kind, np.asarray(state[entry.timm_key]), num_heads)):
      flat[path] = np.ascontiguousarray(array, dtype=np.float32)
  return flax.traverse_util.unflatten_dict(flat, sep="/")


def timm_kwargs(model_info: dict[str, Any], in_chans: int) -> dict[str, Any]:
  """Constructor arguments of timm's `VisionTransformer` for the model in config.json.

  Every argument that changes the numbers is spelled out (rather than left to timm's
  defaults) so a future default change cannot silently alter the rebuilt model.
  """
  width, mlp_dim = int(model_info["width"]), int(model_info["mlp_dim"])
  if mlp_dim % width:
    raise ValueError(f"config.json model: mlp_dim {mlp_dim} is not a multiple of width {width}, "
                     "which timm's mlp_ratio cannot express")
  return dict(
      img_size=int(model_info["image_size"]), patch_size=int(model_info["patch_size"]),
      in_chans=in_chans, num_classes=0, global_pool="token", embed_dim=width,
      depth=int(model_info["depth"]), num_heads=int(model_info["num_heads"]),
      mlp_ratio=mlp_dim / width, qkv_bias=True, class_token=True, no_embed_class=False,
      pre_norm=False, final_norm=True)
