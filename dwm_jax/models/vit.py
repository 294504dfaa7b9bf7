"""ViT encoder over log-mel patches, and the token decoder used as MAE decoder / M2D predictor.

Patches are 16 x 16 (configurable) in frequency-major order (``f_row * Tp + t_col``), the order
of ``dwm_jax.masking`` and of the authors' Conv2d patch embedding; positions are fixed 2-D
sin-cos in the authors' channel layout (time first); a CLS token is prepended; blocks are
timm's pre-LN blocks (fused qkv, exact GELU, LayerNorm eps 1e-6). The encoder runs on the
visible tokens only (``ids_keep``). Parameters are float32; ``dtype`` sets the compute dtype
(e.g. bfloat16). ``tests/test_reference.py`` checks every module against the authors' PyTorch
M2D and MSM-MAE numbers.
"""

from __future__ import annotations

from dwm_jax._extras import require

require("train", "flax")

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dwm_jax import masking


@dataclasses.dataclass(frozen=True)
class ViTSize:
    dim: int
    depth: int
    heads: int
    mlp_ratio: float = 4.0


SIZES = {
    "micro": ViTSize(64, 2, 2),      # tests and smoke runs
    "tiny": ViTSize(192, 12, 3),
    "small": ViTSize(384, 12, 6),
    "base": ViTSize(768, 12, 12),
    "large": ViTSize(1024, 24, 16),
}


def parse_size(size: "str | ViTSize") -> ViTSize:
    """A named size ('base') or 'DIMxDEPTHxHEADS[xMLP_RATIO]' (e.g. '64x2x4', the reference
    fixtures' encoder; a converted checkpoint of another width) -> ViTSize."""
    if isinstance(size, ViTSize):
        return size
    if size in SIZES:
        return SIZES[size]
    parts = str(size).split("x")
    try:
        if len(parts) not in (3, 4):
            raise ValueError
        dim, depth, heads = (int(p) for p in parts[:3])
        ratio = float(parts[3]) if len(parts) == 4 else 4.0
        if min(dim, depth, heads) < 1 or ratio <= 0:
            raise ValueError
    except ValueError:
        raise ValueError(f"model size {size!r} is neither one of {list(SIZES)} nor "
                         "'DIMxDEPTHxHEADS[xMLP_RATIO]' (e.g. '768x12x12')") from None
    return ViTSize(dim, depth, heads, ratio)


def sincos_2d(dim: int, grid: tuple[int, int]) -> np.ndarray:
    """Fixed 2-D sin-cos positions [Fp * Tp, dim] for tokens in frequency-major order.

    The authors' layout (MAE's ``get_2d_sincos_pos_embed`` on a (Fp, Tp) grid, where the half
    it names ``emb_h`` is computed from the *time* coordinate): channels ``[0, dim/2)`` encode
    the time column, ``[dim/2, dim)`` the frequency row; each half is ``dim/4`` sines then
    ``dim/4`` cosines of ``pos * 10000 ** (-i / (dim/4))``. CLS gets no position (their row 0
    is zeros).
    """
    if dim % 4:
        raise ValueError(f"sin-cos positions need dim divisible by 4; got {dim}")
    quarter = dim // 4
    omega = 1.0 / 10000 ** (np.arange(quarter, dtype=np.float64) / quarter)

    def encode(pos):
        angles = np.outer(pos, omega)
        return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)

    rows, cols = np.meshgrid(np.arange(grid[0]), np.arange(grid[1]), indexing="ij")
    emb = np.concatenate([encode(cols.ravel()), encode(rows.ravel())], axis=1)
    return emb.astype(np.float32)


# Accelerator switches (config.model.attention / remat). Each gives the same numbers as the
# default within float tolerance (tests/test_models.py); they trade memory and speed.
ATTENTION = ("xla", "cudnn")          # jax.nn.dot_product_attention's implementation
# config.model.scan_layers: the blocks' parameters stacked on a layer axis and run by one
# jax.lax.scan (run_blocks); checkpoints then hold that layout (stack_layers converts).
REMAT_POLICIES = {                     # what the backward pass keeps of each block's forward
    "none": None,                      # everything (no rematerialisation)
    "full": None,                      # nothing: the block is recomputed
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable":
        jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def run_blocks(blocks, h, remat: str = "none", scan: bool = False):
    """The blocks in order, each under the named rematerialisation policy unless 'none'.

    ``scan``: ``blocks`` is one Block whose parameters carry a leading layer axis (see
    :func:`stack_blocks`), run by one ``jax.lax.scan``, so the program holds one block
    whatever the depth; otherwise a sequence of Blocks, run one after the other.
    """
    if remat not in REMAT_POLICIES:
        raise ValueError(f"remat must be one of {list(REMAT_POLICIES)}; got {remat!r}")
    policy = REMAT_POLICIES[remat]
    if scan:
        graphdef, layers = nnx.split(blocks)

        def body(x, layer):
            return nnx.merge(graphdef, layer)(x), None

        if remat != "none":
            body = jax.checkpoint(body, policy=policy)
        return jax.lax.scan(body, h, layers)[0]
    if remat == "none":
        for block in blocks:
            h = block(h)
        return h
    call = nnx.remat(lambda block, x: block(x), policy=policy)
    for block in blocks:
        h = call(block, h)
    return h


def stack_blocks(blocks) -> "Block":
    """Blocks of one shape -> one Block whose every parameter is theirs stacked on a leading
    layer axis (the scanned layout; built from the same draws as the per-layer one)."""
    states = [nnx.state(block) for block in blocks]
    return nnx.merge(nnx.graphdef(blocks[0]),
                     jax.tree.map(lambda *layers: jnp.stack(layers), *states))


def _per_layer(tree) -> bool:
    return isinstance(tree, dict) and bool(tree) and all(str(k).isdigit() for k in tree)


def stack_layers(tree):
    """Pure-dict parameters in the per-layer layout (``blocks: {0: {...}, 1: {...}}``) -> the
    scanned layout (``blocks: {...}``, each array with a leading layer axis); anything else
    as it is. For trees of either layout: a scanned one passes through unchanged."""
    if not isinstance(tree, dict):
        return tree
    out = {}
    for key, value in tree.items():
        if key == "blocks" and _per_layer(value):
            layers = [value[k] for k in sorted(value, key=int)]
            leaves = jax.tree.leaves(layers)
            xp = np if all(isinstance(a, np.ndarray) for a in leaves) else jnp
            out[key] = jax.tree.map(lambda *a: xp.stack(a), *layers)
        else:
            out[key] = stack_layers(value)
    return out


def unstack_layers(tree):
    """The inverse of :func:`stack_layers`: scanned ``blocks`` -> ``{0: {...}, 1: ...}``."""
    if not isinstance(tree, dict):
        return tree
    out = {}
    for key, value in tree.items():
        if key == "blocks" and isinstance(value, dict) and value and not _per_layer(value):
            depth = jax.tree.leaves(value)[0].shape[0]
            out[key] = {i: jax.tree.map(lambda a, i=i: a[i], value) for i in range(depth)}
        else:
            out[key] = unstack_layers(value)
    return out


class Attention(nnx.Module):
    def __init__(self, dim: int, heads: int, *, dtype, attention: str = "xla",
                 rngs: nnx.Rngs):
        if dim % heads:
            raise ValueError(f"width {dim} is not divisible by {heads} heads")
        if attention not in ATTENTION:
            raise ValueError(f"attention must be one of {ATTENTION}; got {attention!r}")
        self.heads, self.implementation = heads, attention
        self.qkv = nnx.Linear(dim, 3 * dim, dtype=dtype, rngs=rngs,
                              kernel_init=nnx.initializers.xavier_uniform())
        self.proj = nnx.Linear(dim, dim, dtype=dtype, rngs=rngs,
                               kernel_init=nnx.initializers.xavier_uniform())

    def __call__(self, x):  # [B, L, D]
        b, length, d = x.shape
        q, k, v = jnp.split(self.qkv(x).reshape(b, length, 3 * self.heads, d // self.heads),
                            3, axis=2)
        out = jax.nn.dot_product_attention(q, k, v, implementation=self.implementation)
        return self.proj(out.reshape(b, length, d))


class Block(nnx.Module):
    """Pre-LN transformer block: x + attn(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, *, dtype, attention="xla",
                 rngs: nnx.Rngs):
        hidden = int(dim * mlp_ratio)
        self.norm1 = nnx.LayerNorm(dim, epsilon=1e-6, dtype=dtype, rngs=rngs)
        self.attn = Attention(dim, heads, dtype=dtype, attention=attention, rngs=rngs)
        self.norm2 = nnx.LayerNorm(dim, epsilon=1e-6, dtype=dtype, rngs=rngs)
        init = nnx.initializers.xavier_uniform()
        self.fc1 = nnx.Linear(dim, hidden, dtype=dtype, kernel_init=init, rngs=rngs)
        self.fc2 = nnx.Linear(hidden, dim, dtype=dtype, kernel_init=init, rngs=rngs)

    def __call__(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.fc2(jax.nn.gelu(self.fc1(self.norm2(x)), approximate=False))


class Encoder(nnx.Module):
    """ViT over ``[B, F, T]`` log-mel -> tokens ``[B, 1 + K, dim]`` (CLS first), final LN."""

    def __init__(self, size: str | ViTSize = "base", *, input_shape=(80, 608),
                 patch_size=(16, 16), dtype=jnp.float32, attention: str = "xla",
                 remat: str = "none", scan: bool = False, rngs: nnx.Rngs):
        self.size = parse_size(size)
        self.remat, self.scan = remat, bool(scan)
        self.input_shape, self.patch_size = tuple(input_shape), tuple(patch_size)
        self.grid = masking.patch_grid(self.input_shape, self.patch_size)
        self.dtype = dtype
        dim = self.size.dim
        self.patch_embed = nnx.Linear(patch_size[0] * patch_size[1], dim, dtype=dtype,
                                      kernel_init=nnx.initializers.xavier_uniform(), rngs=rngs)
        self.cls_token = nnx.Param(nnx.initializers.normal(0.02)(rngs.params(), (1, 1, dim)))
        blocks = [Block(dim, self.size.heads, self.size.mlp_ratio, dtype=dtype,
                        attention=attention, rngs=rngs) for _ in range(self.size.depth)]
        self.blocks = stack_blocks(blocks) if self.scan else nnx.List(blocks)
        self.norm = nnx.LayerNorm(dim, epsilon=1e-6, dtype=dtype, rngs=rngs)

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    def embed(self, x):
        """[B, F, T'] -> patch tokens with positions [B, Fp * T' / pw, dim].

        ``T'`` is the configured width or, as in the authors' runtime for the last chunk of a
        long clip, any shorter multiple of the patch width: the positions are then those of
        the first ``T' / pw`` time columns.
        """
        (f, t), pw = self.input_shape, self.patch_size[1]
        if x.ndim != 3 or x.shape[1] != f or not 0 < x.shape[2] <= t or x.shape[2] % pw:
            raise ValueError(f"encoder expects input [B, {f}, {t}] (or a shorter multiple of "
                             f"{pw} frames); got {x.shape}")
        tokens = self.patch_embed(masking.patchify(x.astype(self.dtype), self.patch_size))
        pos = jnp.asarray(sincos_2d(self.size.dim, self.grid)).reshape(*self.grid, -1)
        pos = pos[:, : x.shape[2] // pw].reshape(-1, self.size.dim)  # symbolic widths too
        return tokens + pos.astype(self.dtype)

    def __call__(self, x, ids_keep=None):
        """x [B, F, T]; ids_keep int [B, K] or None (all N patches) -> [B, 1 + K, dim]."""
        tokens = self.embed(x)
        if ids_keep is not None:
            tokens = jnp.take_along_axis(tokens, ids_keep[..., None], axis=1)
        return self.encode_tokens(tokens)

    def time_features(self, x):
        """Normalised log-mel [B, F, pw * t] -> per-time-step features [B, t, Fp * dim] in
        float32: every patch encoded, the tokens of a time step's frequency patches
        concatenated (feature ``f * dim + d``). The one encoder-to-features layout: the
        Embedder, fine-tuning and the serialised encoder all read it here."""
        fp, dim = self.grid[0], self.size.dim
        tokens = self(x)[:, 1:].astype(jnp.float32)
        steps = x.shape[2] // self.patch_size[1]
        tokens = tokens.reshape(x.shape[0], fp, steps, dim).transpose(0, 2, 1, 3)
        return tokens.reshape(x.shape[0], steps, fp * dim)

    def encode_tokens(self, tokens):
        """Embedded patch tokens [B, K, dim] -> [CLS, tokens] through the blocks and final LN."""
        cls = jnp.broadcast_to(self.cls_token[...].astype(self.dtype),
                               (tokens.shape[0], 1, self.size.dim))
        h = jnp.concatenate([cls, tokens], axis=1)
        return self.norm(run_blocks(self.blocks, h, self.remat, self.scan))


class TokenDecoder(nnx.Module):
    """Visible tokens [B, 1 + K, in_dim] + ids_restore [B, N] -> outputs [B, N, out_dim].

    Projects to ``dim``, fills the masked positions with a learned mask token, restores the
    patch order, adds fixed positions, runs ``depth`` blocks and a final LN + projection.
    MSM-MAE's decoder (out_dim = patch pixels) and M2D's predictor (out_dim = encoder width).
    """

    def __init__(self, in_dim: int, out_dim: int, *, grid: tuple[int, int], dim: int = 512,
                 depth: int = 8, heads: int = 16, mlp_ratio: float = 4.0, dtype=jnp.float32,
                 attention: str = "xla", remat: str = "none", scan: bool = False,
                 rngs: nnx.Rngs):
        self.grid, self.dim, self.dtype = tuple(grid), dim, dtype
        self.remat, self.scan = remat, bool(scan)
        init = nnx.initializers.xavier_uniform()
        self.embed = nnx.Linear(in_dim, dim, dtype=dtype, kernel_init=init, rngs=rngs)
        self.mask_token = nnx.Param(nnx.initializers.normal(0.02)(rngs.params(), (1, 1, dim)))
        blocks = [Block(dim, heads, mlp_ratio, dtype=dtype, attention=attention, rngs=rngs)
                  for _ in range(depth)]
        self.blocks = stack_blocks(blocks) if self.scan else nnx.List(blocks)
        self.norm = nnx.LayerNorm(dim, epsilon=1e-6, dtype=dtype, rngs=rngs)
        self.head = nnx.Linear(dim, out_dim, dtype=dtype, kernel_init=init, rngs=rngs)

    def __call__(self, tokens, ids_restore):
        h = run_blocks(self.blocks, self.prepare(tokens, ids_restore), self.remat, self.scan)
        return self.head(self.norm(h))[:, 1:]

    def prepare(self, tokens, ids_restore):
        """The input of the first block [B, 1 + N, dim]: embedded CLS, then every patch in
        patch order (visible tokens or the mask token) plus its position."""
        b, n = ids_restore.shape
        h = self.embed(tokens)
        cls, visible = h[:, :1], h[:, 1:]
        fill = jnp.broadcast_to(self.mask_token[...].astype(self.dtype),
                                (b, n - visible.shape[1], self.dim))
        h = jnp.concatenate([visible, fill], axis=1)  # shuffled order: keep, then masked
        h = jnp.take_along_axis(h, ids_restore[..., None], axis=1)  # patch order
        h = h + sincos_2d(self.dim, self.grid).astype(self.dtype)
        return jnp.concatenate([cls, h], axis=1)
