"""The S-PCL training step written in PyTorch from timm blocks: the same-run reference that
`python -m spcl_jax.bench train --reference torch` times against ours.

Written independently of the JAX code, from docs/method.md, so that equal numbers are a check of
the objective across frameworks (tests/test_torch_reference.py): only the constants (the fixed
sin-cos table, the view size, the learning-rate schedule) and the weight export are shared.

One step: uint8 images (B, H, W) on the device -> normalise -> patchify -> per image a random
permutation of the N patch indices (torch.rand + argsort, on the device: the cost class of our
jax.random masking), view 1 = the first h, view 2 = the next h -> both views through the one
encoder as a batch of 2B -> CLS z (2B, D) in float32 -> similarity logits of every embedding
against all 2B (self masked out) x clamped learnable scale -> cross-entropy to the partner view
('all' negatives; 'cross' = OCL) -> backward -> AdamW (fused on CUDA) with our learning rate and
weight-decay mask -> log-scale clamped back into [0, log max_scale].

The encoder is timm's pre-LN `Block` (fused qkv Linear, SDPA attention through timm's
fused_attn, exact GELU, LayerNorm eps 1e-6), a Linear patch embedding on gathered patches (the
stride-P conv as a matmul, patch pixels in (py, px, c) order), one CLS token without a position
and a final LayerNorm. In bfloat16 it runs under torch.autocast, PyTorch's usual mixed
precision (float32 residual stream and LayerNorms, bf16 matmuls), and the loss in float32.
Only APIs present in torch 2.11 / timm 1.0.29 are used (the accelerator image's versions).
"""

from __future__ import annotations

import contextlib
import functools
import math
from typing import Any

import numpy as np
import torch
from timm.models.vision_transformer import Block
from torch import nn

from spcl_jax import masking
from spcl_jax.weights.layout import pos_embed_with_cls_row, timm_state_dict
from spcl_jax.models.vit import sincos_2d_posemb, variant_dims

SIMILARITIES = ("tsp", "cosine")
NEGATIVES = ("all", "cross")


class Encoder(nn.Module):
  """Gathered patches (n, h, P*P*C) + their grid indices (n, h) -> CLS after the final norm (n, D).

  Parameter names are timm's VisionTransformer's (cls_token, blocks.*, norm.*) except the patch
  embedding, a Linear here (`patch_embed.weight` (D, P*P*C)) where timm has a conv.
  """

  def __init__(self, width: int, depth: int, num_heads: int, mlp_dim: int, patch_size: int,
               image_size: int, channels: int = 1):
    super().__init__()
    self.patch_size, self.channels, self.grid_size = patch_size, channels, image_size // patch_size
    self.patch_embed = nn.Linear(patch_size * patch_size * channels, width)
    self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
    self.register_buffer("pos_table", torch.from_numpy(sincos_2d_posemb(self.grid_size, width)),
                         persistent=False)
    norm = functools.partial(nn.LayerNorm, eps=1e-6)
    self.blocks = nn.Sequential(*[
        Block(dim=width, num_heads=num_heads, mlp_ratio=mlp_dim / width, qkv_bias=True,
              act_layer=nn.GELU, norm_layer=norm) for _ in range(depth)])
    self.norm = norm(width)
    for module in self.modules():  # timm's ViT init for Linear layers; LayerNorm is (1, 0)
      if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        nn.init.zeros_(module.bias)

  def forward(self, patches: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    tokens = self.patch_embed(patches) + self.pos_table[positions]
    x = torch.cat([self.cls_token.expand(tokens.shape[0], -1, -1).to(tokens.dtype), tokens], 1)
    x = self.blocks(x)
    return self.norm(x[:, 0])  # LayerNorm is per token: normalising CLS alone gives the same z


def build_encoder(model_config: Any) -> Encoder:
  """`config.model` (variant, image_size, channels) -> the torch encoder with our dimensions."""
  dims = variant_dims(model_config.variant)
  return Encoder(**dims, image_size=model_config.image_size,
                 channels=model_config.get("channels", 1))


def load_jax_encoder(encoder: Encoder, encoder_params: Any) -> None:
  """Copies our encoder parameters in through the project's timm export (layout.py)."""
  state = timm_state_dict(encoder_params, encoder.grid_size, encoder.channels)
  expected_pos = pos_embed_with_cls_row(encoder.grid_size, encoder.cls_token.shape[-1])
  if not np.array_equal(state.pop("pos_embed"), expected_pos):
    raise ValueError("the exported pos_embed is not the fixed sin-cos table this encoder adds")
  conv = state.pop("patch_embed.proj.weight")                             # (D, C, P, P)
  # Linear input feature (py * P + px) * C + c = our patchify order.
  state["patch_embed.weight"] = conv.transpose(0, 2, 3, 1).reshape(conv.shape[0], -1)
  state["patch_embed.bias"] = state.pop("patch_embed.proj.bias")
  encoder.load_state_dict({k: torch.from_numpy(np.array(v, np.float32))  # a writable copy
                           for k, v in state.items()}, strict=True)


def patchify(images: torch.Tensor, patch_size: int, mean: float, std: float) -> torch.Tensor:
  """uint8 (B, H, W[, C]) -> normalised float32 (B, N, P*P*C), patches row-major, (py, px, c)."""
  if images.ndim == 3:
    images = images[..., None]
  b, h, w, c = images.shape
  p = patch_size
  x = (images.float() / 255.0 - mean) / std
  x = x.reshape(b, h // p, p, w // p, p, c).permute(0, 1, 3, 2, 4, 5)
  return x.reshape(b, (h // p) * (w // p), p * p * c)


def random_view_positions(batch: int, num_patches: int, view_size: int,
                          device: torch.device) -> torch.Tensor:
  """(2, B, h) int64: per image a uniform permutation of the patches, views = first h, next h."""
  order = torch.rand(batch, num_patches, device=device).argsort(dim=1)[:, :2 * view_size]
  return order.reshape(batch, 2, view_size).transpose(0, 1)


def gather_views(patches: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
  """(B, N, F) patches, (2, B, h) positions -> (2B, h, F): view 1 of every image, then view 2."""
  features = patches.shape[-1]
  return torch.cat([torch.gather(patches, 1, view[..., None].expand(-1, -1, features))
                    for view in positions])


def similarity(cos: torch.Tensor, name: str, kappa: float) -> torch.Tensor:
  if name == "tsp":  # T-SP, docs/method.md §4: 0.5 (1 + c) / (1 + (1 - c) kappa)
    return 0.5 * (1.0 + cos) / (1.0 + (1.0 - cos) * kappa)
  if name == "cosine":
    return cos
  raise ValueError(f"config.spcl.similarity={name!r}: the torch reference knows {SIMILARITIES}")


def spcl_loss(z: torch.Tensor, log_scale: torch.Tensor, *, similarity_name: str = "tsp",
              kappa: float = 1 / 64, negatives: str = "all",
              max_scale: float = 100.0) -> torch.Tensor:
  """InfoNCE of z = [z1; z2] (2B, D): row i's positive is its other view, i +- B."""
  two_b = z.shape[0]
  b = two_b // 2
  unit = nn.functional.normalize(z.float(), dim=-1, eps=1e-12)
  cos = (unit @ unit.T).clamp(-1.0, 1.0)
  # torch.minimum splits the gradient at a tie (as jnp.minimum), so log_s exactly at the cap
  # still learns; full_like fills on the device (torch.tensor would copy from the host each step).
  scale = torch.exp(torch.minimum(log_scale, torch.full_like(log_scale, math.log(max_scale))))
  eye = torch.eye(two_b, dtype=torch.bool, device=z.device)
  logits = (similarity(cos, similarity_name, kappa) * scale).masked_fill(eye, float("-inf"))
  own = torch.arange(b, device=z.device)
  if negatives == "all":  # 2(B - 1) negatives per row: every other embedding
    return nn.functional.cross_entropy(logits, torch.cat([own + b, own]))
  if negatives == "cross":  # OCL: view-1 rows against view-2 columns and back
    return 0.5 * (nn.functional.cross_entropy(logits[:b, b:], own)
                  + nn.functional.cross_entropy(logits[b:, :b], own))
  raise ValueError(f"config.spcl.negatives={negatives!r}: expected one of {NEGATIVES}")


def decays(name: str, parameter: torch.Tensor) -> bool:
  """Our weight-decay mask (spcl_jax/optimizer.py): matmul and patch-embedding weights only."""
  return name.endswith(".weight") and parameter.ndim == 2


class TorchStep:
  """The encoder, the learnable log-scale and AdamW, stepped like our train step.

  `params`: our parameter tree ({'encoder', 'log_scale'}, e.g. TrainState.params on the host)
  to start from; None initialises afresh.

  `compile_backend`: None runs eager; otherwise the encoder runs under torch.compile with that
  backend ('inductor': generated kernels; 'aot_eager': traced, no code generation) and, for
  inductor, `compile_mode` (None: torch's default; 'max-autotune', ...).
  """

  def __init__(self, config: Any, device: str | torch.device = "cpu",
               compile_backend: str | None = None, compile_mode: str | None = None,
               params: Any = None):
    self.config, self.device = config, torch.device(device)
    self.encoder = build_encoder(config.model)
    init = math.log(1.0 / config.spcl.init_temperature)
    if params is not None:  # our {'encoder', 'log_scale'}: start from the same weights
      load_jax_encoder(self.encoder, params["encoder"])
      init = float(params["log_scale"])
    self.encoder.to(self.device)
    self.log_scale = nn.Parameter(torch.tensor(init, device=self.device),
                                  requires_grad=bool(config.spcl.learn_temperature))
    self.forward_encoder = (
        self.encoder if compile_backend is None
        else torch.compile(self.encoder, backend=compile_backend, mode=compile_mode))
    self.num_patches = self.encoder.grid_size ** 2
    self.view_size = masking.view_size(self.num_patches, config.spcl.mask_ratio)
    if config.model.dtype not in ("float32", "bfloat16"):
      raise ValueError(f"config.model.dtype={config.model.dtype!r}: the torch reference runs "
                       "float32 or bfloat16 (autocast)")
    self.autocast_dtype = torch.bfloat16 if config.model.dtype == "bfloat16" else None
    named = list(self.encoder.named_parameters())
    groups = [{"params": [p for n, p in named if decays(n, p)],
               "weight_decay": config.optim.weight_decay},
              {"params": [p for n, p in named if not decays(n, p)] + [self.log_scale],
               "weight_decay": 0.0}]
    # lr is set before every step from our schedule; eps 1e-8 is optax.adamw's.
    self.optimizer = torch.optim.AdamW(
        groups, lr=0.0, betas=(config.optim.b1, config.optim.b2), eps=1e-8,
        fused=True if self.device.type == "cuda" else None)

  def parameters(self) -> list[torch.Tensor]:
    return [*self.encoder.parameters(), self.log_scale]

  def _autocast(self):
    if self.autocast_dtype is None:
      return contextlib.nullcontext()
    return torch.autocast(self.device.type, dtype=self.autocast_dtype)

  def loss(self, images: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """The S-PCL loss of uint8 images (B, H, W) with view positions (2, B, h)."""
    spcl = self.config.spcl
    patches = patchify(images, self.encoder.patch_size, self.config.data.mean,
                       self.config.data.std)
    views = gather_views(patches, positions)
    with self._autocast():
      z = self.forward_encoder(views, positions.reshape(-1, positions.shape[-1]))
    return spcl_loss(z.float(), self.log_scale, similarity_name=spcl.similarity,
                     kappa=spcl.get("kappa", 0.0), negatives=spcl.negatives,
                     max_scale=spcl.max_scale)

  def loss_and_gradients(self, images: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """The loss; the gradients are left in each parameter's .grad."""
    self.optimizer.zero_grad(set_to_none=True)
    value = self.loss(images, positions)
    value.backward()
    return value.detach()

  def apply_gradients(self, learning_rate: float) -> None:
    clip = self.config.optim.grad_clip_norm
    if clip > 0:
      torch.nn.utils.clip_grad_norm_(self.parameters(), clip)
    for group in self.optimizer.param_groups:
      group["lr"] = learning_rate
    self.optimizer.step()
    with torch.no_grad():  # as losses.clamp_log_scale: the parameter back into [0, log max]
      self.log_scale.clamp_(0.0, math.log(self.config.spcl.max_scale))

  def step(self, images: torch.Tensor, learning_rate: float) -> torch.Tensor:
    """One training step with fresh random views (what the benchmark times); returns the loss."""
    positions = random_view_positions(images.shape[0], self.num_patches, self.view_size,
                                      self.device)
    value = self.loss_and_gradients(images, positions)
    self.apply_gradients(learning_rate)
    return value


def gradient_norm(parameters: list[torch.Tensor]) -> float:
  """Global L2 norm of the gradients (as optax.tree.norm of our grads: log-scale included)."""
  squares = [p.grad.double().pow(2).sum() for p in parameters if p.grad is not None]
  return float(torch.stack(squares).sum().sqrt())
