"""timm, Medical MAE and big_vision checkpoints -> our encoder parameters: the export run backwards.

  params, info = import_encoder(path, in_chans=1, image_size=None, num_heads=None)

  .safetensors  timm `VisionTransformer` state dict; the JSON sidecar our export writes beside it
                (OUT.json) gives the head count and whether pos_embed has a CLS row.
  .pth / .pt    Medical MAE: `torch.load(path)["model"]` (torch needed; loaded with
                weights_only=True). A pre-training checkpoint's decoder (decoder_*, mask_token)
                is ignored and listed in info["ignored"].
  .npz          big_vision: '/'-joined names (ours), blocks unrolled (encoderblock_i) or stacked
                by `nn.scan` (encoderblock with a leading depth axis).

timm keys map to ours through `layout.encoder_table`, the table the export uses. What our
encoder has no parameter for is handled so that the imported model computes what the source did:
  - CLS row of pos_embed: timm adds it to the CLS token; our encoder adds no position to CLS, so
    the row is folded into `cls` (cls + row).
  - Patch positions: our encoder adds a fixed sin-cos table. info["pos_embedding"] is the
    source's table (1, grid**2, D) at the target grid (resampled bicubically when the grid
    differs), and info["pos_embedding_is_sincos"] says whether it is that fixed table (then the
    encoder is exact as it is; otherwise a model must add info["pos_embedding"] itself).
  - A 3-channel patch kernel becomes 1 channel (`in_chans=1`, the default) by summing over
    channels: a grey image copied to 3 channels gives the same response. `in_chans=None` keeps
    the source's channels.
  - A classifier's `fc_norm` and `head` (timm global_pool='avg', Medical MAE fine-tuned models)
    are returned in info["extras"] in flax layout ({"scale", "bias"}, {"kernel" (D, K), "bias"});
    when such a model has no final `norm` (timm makes it the identity), encoder_norm is set to the
    identity (scale 1, bias 0) and info["encoder_norm_is_identity"] is True.
Every error names the file and the key or shape at fault.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
from typing import Any

import flax
import numpy as np

from spcl_jax.weights import layout, npz_format
from spcl_jax.models.vit import VARIANTS, VisionTransformer, abstract_params, sincos_2d_posemb

FORMAT_OF_SUFFIX = {".safetensors": "timm", ".pth": "medical_mae", ".pt": "medical_mae",
                    ".npz": "big_vision"}
# Keys of an MAE pre-training checkpoint that belong to its decoder, not the encoder.
_DECODER_PREFIXES = ("decoder_", "mask_token")
_CLASSIFIER_PREFIXES = ("head.", "fc_norm.")
_BV_CLASSIFIER = ("head/",)
SINCOS_TOLERANCE = 1e-4  # MAE computes the table in float64 and stores float32.


def _is_square(n: int) -> bool:
  return n > 0 and math.isqrt(n) ** 2 == n


def _heads_for_width(width: int, path: pathlib.Path) -> int:
  """The head count of the standard variant of this width (one of VARIANTS)."""
  for w, _, heads, _ in VARIANTS.values():
    if w == width:
      return heads
  raise ValueError(f"{str(path)!r}: cannot tell the number of attention heads of a {width}-wide "
                   "ViT (no sidecar says it and no standard variant has that width); pass "
                   "num_heads")


# --- reading each format into one shape: a flat timm-style state and what we know about it ------

def _read_timm(path: pathlib.Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
  try:
    from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError("importing a timm .safetensors needs safetensors: pip install -e "
                      "'.[torch]'") from e
  state = load_file(str(path))
  sidecar = path.with_suffix(".json")
  description = json.loads(sidecar.read_text()) if sidecar.is_file() else {}
  return state, description


def _read_medical_mae(path: pathlib.Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError("importing a Medical MAE .pth needs torch: pip install -e '.[torch]'") from e
  # MAE's save_model stores its argparse Namespace beside the weights; allow that one class and
  # nothing else executable (weights_only=True).
  with torch.serialization.safe_globals([argparse.Namespace]):
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
  if isinstance(checkpoint, dict) and isinstance(checkpoint.get("model"), dict):
    state, description = checkpoint["model"], checkpoint.get("spcl_jax") or {}
  elif isinstance(checkpoint, dict) and checkpoint and all(
      isinstance(v, torch.Tensor) for v in checkpoint.values()):
    state, description = checkpoint, {}
  else:
    keys = sorted(checkpoint) if isinstance(checkpoint, dict) else type(checkpoint).__name__
    raise ValueError(f"{str(path)!r}: expected Medical MAE's {{'model': state_dict}}, found {keys}")
  if state and all(k.startswith("module.") for k in state):  # saved from a DDP wrapper
    state = {k.removeprefix("module."): v for k, v in state.items()}
  return {k: v.detach().float().numpy() for k, v in state.items()}, description


def _unstack_scanned_blocks(flat: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """big_vision's `scan` layout (Transformer/encoderblock/..., leading depth axis) -> unrolled."""
  stacked = "Transformer/encoderblock/"
  out = {k: v for k, v in flat.items() if not k.startswith(stacked)}
  for key, value in flat.items():
    if key.startswith(stacked):
      for i, block in enumerate(value):
        out[f"Transformer/encoderblock_{i}/{key[len(stacked):]}"] = block
  return out


def _read_big_vision(path: pathlib.Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
  """big_vision arrays -> timm-style state (through the same table), so one path checks both."""
  flat = _unstack_scanned_blocks(npz_format.read_npz(path))
  state: dict[str, np.ndarray] = {}
  for key in [k for k in flat if k.startswith(_BV_CLASSIFIER)]:
    kind = "linear" if key.endswith("kernel") else "copy"
    state["head." + ("weight" if key.endswith("kernel") else "bias")] = layout.to_timm(
        kind, [flat.pop(key)])
  if npz_format.POS_EMBEDDING in flat:
    state["pos_embed"] = flat.pop(npz_format.POS_EMBEDDING)  # big_vision: no CLS row
  depth = len({k.split("/")[1] for k in flat if k.startswith("Transformer/encoderblock_")})
  for entry in layout.encoder_table(depth):
    if all(p in flat for p in entry.paths):
      try:
        state[entry.timm_key] = layout.to_timm(entry.kind, [flat.pop(p) for p in entry.paths])
      except ValueError as e:
        raise ValueError(f"{str(path)!r}: {', '.join(entry.paths)} do not fit together: {e}"
                         ) from None
  if flat:
    raise ValueError(f"{str(path)!r}: unknown big_vision parameter(s) {sorted(flat)[:6]} "
                     f"({len(flat)} in all): not a ViT encoder this importer knows (MAP heads "
                     "and learned-pooling variants are not supported)")
  return state, {"timm_kwargs": {"no_embed_class": True}}


# --- checks and conversion ---------------------------------------------------------------------

def _architecture(state: dict[str, np.ndarray], description: dict, num_heads: int | None,
                  path: pathlib.Path) -> dict[str, int]:
  for key in ("cls_token", "patch_embed.proj.weight", "blocks.0.mlp.fc1.weight"):
    if key not in state:
      raise ValueError(f"{str(path)!r}: no {key!r}; not a timm VisionTransformer with a class "
                       "token (keys start with " + ", ".join(sorted(state)[:4]) + ")")
  kernel = state["patch_embed.proj.weight"]
  if kernel.ndim != 4 or kernel.shape[2] != kernel.shape[3]:
    raise ValueError(f"{str(path)!r}: patch_embed.proj.weight has shape {kernel.shape}, "
                     "expected (D, C, P, P)")
  width, channels, patch = kernel.shape[0], kernel.shape[1], kernel.shape[2]
  indices = {int(k.split(".")[1]) for k in state if k.startswith("blocks.")}
  depth = max(indices) + 1
  if indices != set(range(depth)):
    raise ValueError(f"{str(path)!r}: blocks are not numbered 0..{depth - 1}: "
                     f"{sorted(indices)}")
  if num_heads is None:
    num_heads = description.get("timm_kwargs", {}).get("num_heads")
  num_heads = int(num_heads or _heads_for_width(width, path))
  if width % num_heads:
    raise ValueError(f"{str(path)!r}: width {width} is not divisible by {num_heads} heads")
  return dict(width=width, depth=depth, num_heads=num_heads,
              mlp_dim=state["blocks.0.mlp.fc1.weight"].shape[0], patch_size=patch,
              channels=channels)


def _expected_timm_shape(key: str, arch: dict[str, int]) -> tuple[int, ...]:
  d, m = arch["width"], arch["mlp_dim"]
  if key == "cls_token":
    return (1, 1, d)
  if key == "patch_embed.proj.weight":
    return (d, arch["channels"], arch["patch_size"], arch["patch_size"])
  suffix = key.split(".", 2)[-1] if key.startswith("blocks.") else key
  return {"attn.qkv.weight": (3 * d, d), "attn.qkv.bias": (3 * d,), "attn.proj.weight": (d, d),
          "mlp.fc1.weight": (m, d), "mlp.fc1.bias": (m,), "mlp.fc2.weight": (d, m)}.get(
              suffix, (d,))


def _split_state(state: dict[str, np.ndarray], arch: dict[str, int], path: pathlib.Path):
  """-> (encoder state, classifier arrays, ignored keys); unknown or missing keys are errors."""
  table_keys = {entry.timm_key for entry in layout.encoder_table(arch["depth"])}
  encoder, extras, ignored, unknown = {}, {}, [], []
  for key, value in state.items():
    if key in table_keys or key == "pos_embed":
      encoder[key] = value
    elif key.startswith(_CLASSIFIER_PREFIXES):
      extras[key] = value
    elif key.startswith(_DECODER_PREFIXES):
      ignored.append(key)
    else:
      unknown.append(key)
  if unknown:
    raise ValueError(f"{str(path)!r}: unknown key(s) {sorted(unknown)[:6]} ({len(unknown)} in "
                     "all): not part of a timm ViT encoder, classifier or MAE decoder")
  identity_norm = "norm.weight" not in encoder and "fc_norm.weight" in extras
  if identity_norm:
    # timm's global_pool='avg' with fc_norm makes the final norm the identity: keep it so.
    encoder["norm.weight"] = np.ones(arch["width"], np.float32)
    encoder["norm.bias"] = np.zeros(arch["width"], np.float32)
  missing = sorted(table_keys - set(encoder))
  if missing:
    raise ValueError(f"{str(path)!r}: missing key(s) {missing[:6]} ({len(missing)} in all) of "
                     f"a depth-{arch['depth']} ViT")
  for key in table_keys:
    expected = _expected_timm_shape(key, arch)
    if tuple(encoder[key].shape) != expected:
      raise ValueError(f"{str(path)!r}: {key} has shape {tuple(encoder[key].shape)}, expected "
                       f"{expected} (width {arch['width']}, mlp {arch['mlp_dim']}, patch "
                       f"{arch['patch_size']}, {arch['channels']} channels)")
  return encoder, extras, sorted(ignored), identity_norm


def _split_pos_embed(pos: np.ndarray | None, description: dict, arch: dict[str, int],
                     path: pathlib.Path) -> tuple[np.ndarray | None, np.ndarray | None]:
  """(CLS row (D,) or None, patch table (N, D) or None) of timm's pos_embed."""
  if pos is None:
    return None, None
  pos = np.asarray(pos, np.float32).reshape(-1, pos.shape[-1])
  if pos.shape[-1] != arch["width"]:
    raise ValueError(f"{str(path)!r}: pos_embed has width {pos.shape[-1]}, not {arch['width']}")
  no_embed_class = description.get("timm_kwargs", {}).get("no_embed_class")
  if no_embed_class is None:  # Unknown: a square token count has no CLS row.
    no_embed_class = _is_square(pos.shape[0])
  table = pos if no_embed_class else pos[1:]
  if not _is_square(table.shape[0]):
    raise ValueError(f"{str(path)!r}: pos_embed has {pos.shape[0]} rows, not a square grid "
                     f"{'' if no_embed_class else 'after the CLS row'}")
  return (None if no_embed_class else pos[0]), table


def resample_table(table: np.ndarray, grid: int) -> np.ndarray:
  """(g*g, D) position table -> (grid*grid, D), bicubic over the 2-D grid (as timm resamples)."""
  import jax  # pylint: disable=g-import-not-at-top
  g = math.isqrt(table.shape[0])
  if g == grid:
    return table
  image = table.reshape(g, g, -1)
  return np.asarray(jax.image.resize(image, (grid, grid, image.shape[-1]), "cubic"),
                    np.float32).reshape(grid * grid, -1)


def _convert_channels(kernel: np.ndarray, in_chans: int | None, path: pathlib.Path) -> np.ndarray:
  channels = kernel.shape[2]
  if in_chans is None or in_chans == channels:
    return kernel
  if in_chans == 1:
    # A grey image copied to every channel: sum_c x W_c = x sum_c W_c. float64 keeps an exported
    # W / 3 spread adding back to W as closely as float32 allows.
    return kernel.astype(np.float64).sum(axis=2, keepdims=True).astype(np.float32)
  if channels == 1:
    return layout.spread_over_channels(kernel, in_chans)
  raise ValueError(f"{str(path)!r}: cannot turn a {channels}-channel patch kernel into "
                   f"{in_chans} channels")


def _check_against_model(params: dict[str, Any], arch: dict[str, int], grid: int,
                         path: pathlib.Path) -> None:
  model = VisionTransformer(width=arch["width"], depth=arch["depth"],
                            num_heads=arch["num_heads"], mlp_dim=arch["mlp_dim"],
                            patch_size=arch["patch_size"], image_size=grid * arch["patch_size"],
                            channels=params["embedding"]["kernel"].shape[2])
  expected = flax.traverse_util.flatten_dict(abstract_params(model), sep="/")
  actual = flax.traverse_util.flatten_dict(params, sep="/")
  for name in sorted(expected.keys() | actual.keys()):
    got = tuple(np.shape(actual[name])) if name in actual else None
    want = tuple(expected[name].shape) if name in expected else None
    if got != want:
      raise ValueError(f"{str(path)!r}: parameter {name!r} has shape {got}, our ViT expects "
                       f"{want}")


def _variant_name(arch: dict[str, int]) -> str | None:
  for name, dims in VARIANTS.items():
    if dims == (arch["width"], arch["depth"], arch["num_heads"], arch["mlp_dim"]):
      return f"{name}/{arch['patch_size']}"
  return None


def import_encoder(path: str | os.PathLike[str], *, in_chans: int | None = 1,
                   image_size: int | None = None, num_heads: int | None = None
                   ) -> tuple[dict[str, Any], dict[str, Any]]:
  """(encoder params in our layout, float32 numpy; info) from a timm, Medical MAE or big_vision
  checkpoint. `image_size`: the input size the encoder will see (default: the source's)."""
  path = pathlib.Path(path).expanduser()
  if not path.is_file():
    raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
  source_format = FORMAT_OF_SUFFIX.get(path.suffix)
  if source_format is None:
    raise ValueError(f"{str(path)!r}: unknown checkpoint type {path.suffix!r}; expected "
                     f"{', '.join(FORMAT_OF_SUFFIX)}")
  reader = {"timm": _read_timm, "medical_mae": _read_medical_mae,
            "big_vision": _read_big_vision}[source_format]
  state, description = reader(path)
  state = {k: np.asarray(v, np.float32) for k, v in state.items()}
  arch = _architecture(state, description, num_heads, path)
  encoder, extras, ignored, identity_norm = _split_state(state, arch, path)
  cls_row, table = _split_pos_embed(encoder.pop("pos_embed", None), description, arch, path)
  params = layout.params_from_timm(encoder, arch["depth"], arch["num_heads"])
  if cls_row is not None:
    params["cls"] = params["cls"] + cls_row.reshape(1, 1, -1)
  params["embedding"]["kernel"] = _convert_channels(params["embedding"]["kernel"], in_chans, path)
  source_grid = math.isqrt(table.shape[0]) if table is not None else None
  if image_size is not None and image_size % arch["patch_size"]:
    raise ValueError(f"image_size {image_size} is not a multiple of the patch size "
                     f"{arch['patch_size']} of {str(path)!r}")
  grid = image_size // arch["patch_size"] if image_size else source_grid
  if grid is None:
    raise ValueError(f"{str(path)!r} has no pos_embed: pass image_size")
  is_sincos = table is None or bool(np.allclose(
      table, sincos_2d_posemb(source_grid, arch["width"]), atol=SINCOS_TOLERANCE))
  # A sin-cos table at another grid is the sin-cos table of that grid, not an interpolation.
  target_table = (sincos_2d_posemb(grid, arch["width"]) if is_sincos
                  else resample_table(table, grid))
  _check_against_model(params, arch, grid, path)
  info = {
      "format": source_format, "file": str(path.resolve()),
      "model": {**arch, "channels": int(params["embedding"]["kernel"].shape[2]),
                "variant": _variant_name(arch), "image_size": grid * arch["patch_size"]},
      "source_channels": arch["channels"], "source_grid": source_grid, "grid": grid,
      "pos_embedding": target_table[None], "pos_embedding_is_sincos": is_sincos,
      "cls_position_folded": cls_row is not None and bool(np.any(cls_row)),
      "extras": _flax_extras(extras), "ignored": ignored,
      "encoder_norm_is_identity": identity_norm,
  }
  return params, info


def _flax_extras(extras: dict[str, np.ndarray]) -> dict[str, dict[str, np.ndarray]]:
  out: dict[str, dict[str, np.ndarray]] = {}
  if "fc_norm.weight" in extras:
    out["fc_norm"] = {"scale": extras["fc_norm.weight"], "bias": extras["fc_norm.bias"]}
  if "head.weight" in extras:
    out["head"] = {"kernel": layout.from_timm("linear", extras["head.weight"], 1)[0],
                   "bias": extras["head.bias"]}
  return out
