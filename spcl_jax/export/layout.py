"""JAX encoder parameters -> timm's `VisionTransformer` state dict, as numpy arrays (no torch).

Keys and layouts (METHOD.md section 8):

  patch_embed.proj.weight (D, C, P, P)  <- embedding/kernel (P, P, C, D), transposed
  cls_token (1, 1, D)                   <- cls
  pos_embed (1, 1 + N, D)               <- the fixed sin-cos table, with a zero CLS row
  blocks.{i}.attn.qkv.weight (3D, D)    <- query, key, value kernels (D, H, Dh), stacked
  blocks.{i}.attn.proj.weight (D, D)    <- out kernel (H, Dh, D)
  blocks.{i}.norm1/norm2, mlp.fc1/fc2   <- LayerNorm_0/1, MlpBlock_0/Dense_0/1 (kernels transposed)
  norm                                  <- Transformer/encoder_norm

Medical MAE's ViT is timm's with the same keys, so both formats use this one mapping.
"""

from __future__ import annotations

from typing import Any

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


def _linear(dense: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
  """Flax Dense (in, out) kernel -> torch Linear (out, in) weight, bias unchanged."""
  return np.asarray(dense["kernel"]).T, np.asarray(dense["bias"])


def _layer_norm(prefix: str, ln: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  return {f"{prefix}.weight": np.asarray(ln["scale"]), f"{prefix}.bias": np.asarray(ln["bias"])}


def _attention(prefix: str, mha: dict[str, Any]) -> dict[str, np.ndarray]:
  # query/key/value kernels are (D, H, Dh); flattening (H, Dh) gives the output feature
  # h * Dh + dh, the order in which timm splits qkv into heads.
  width = np.shape(mha["query"]["kernel"])[0]
  qkv_w = [np.asarray(mha[n]["kernel"]).reshape(width, -1).T for n in ("query", "key", "value")]
  qkv_b = [np.asarray(mha[n]["bias"]).reshape(-1) for n in ("query", "key", "value")]
  out_kernel = np.asarray(mha["out"]["kernel"])  # (H, Dh, D): input feature h * Dh + dh
  return {
      f"{prefix}.qkv.weight": np.concatenate(qkv_w, axis=0),
      f"{prefix}.qkv.bias": np.concatenate(qkv_b, axis=0),
      f"{prefix}.proj.weight": out_kernel.reshape(-1, out_kernel.shape[-1]).T,
      f"{prefix}.proj.bias": np.asarray(mha["out"]["bias"]),
  }


def _block(i: int, block: dict[str, Any]) -> dict[str, np.ndarray]:
  prefix = f"blocks.{i}"
  out = {}
  out.update(_layer_norm(f"{prefix}.norm1", block["LayerNorm_0"]))
  out.update(_attention(f"{prefix}.attn", block["MultiHeadDotProductAttention_0"]))
  out.update(_layer_norm(f"{prefix}.norm2", block["LayerNorm_1"]))
  for j, dense in enumerate(("Dense_0", "Dense_1")):
    weight, bias = _linear(block["MlpBlock_0"][dense])
    out[f"{prefix}.mlp.fc{j + 1}.weight"] = weight
    out[f"{prefix}.mlp.fc{j + 1}.bias"] = bias
  return out


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
  kernel = spread_over_channels(np.asarray(params["embedding"]["kernel"]), in_chans)
  width = kernel.shape[-1]
  state = {
      "cls_token": np.asarray(params["cls"]),
      "pos_embed": pos_embed_with_cls_row(grid_size, width),
      "patch_embed.proj.weight": kernel.transpose(3, 2, 0, 1),  # (P, P, C, D) -> (D, C, P, P)
      "patch_embed.proj.bias": np.asarray(params["embedding"]["bias"]),
  }
  transformer = params["Transformer"]
  for i in range(num_blocks(params)):
    state.update(_block(i, transformer[f"encoderblock_{i}"]))
  if "encoder_norm" in transformer:  # absent in a classifier pooled with fc_norm instead
    state.update(_layer_norm("norm", transformer["encoder_norm"]))
  # Contiguous float32: safetensors refuses strided views, torch.load keeps whatever it gets.
  return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in state.items()}


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
