"""The 1-D temporal UNet noise-prediction head of Diffusion Policy (Chi et al., 2023).

Layout-compatible with real-stanford `diffusion_policy`'s `ConditionalUnet1D` (global
conditioning only, no `local_cond`): the module names and parameter shapes are the same, so a
state dict saved by the reference loads here with `strict=True` and gives the same output.

    sample (B, T, A) --down--> mid --up--> (B, T, A)
    cond = [step embedding (B, dsed), global_cond (B, G)] feeds every residual block by FiLM.

The model is tensor in, tensor out: normalization lives in `dprgb.trainer.normalizer`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn as nn


class SinusoidalPosEmb(nn.Module):
    """Diffusion step -> (B, dim) features [sin | cos], frequencies geometric in 1..1/10000."""

    def __init__(self, dim: int):
        super().__init__()
        if dim < 4 or dim % 2:
            raise ValueError(f"sinusoidal embedding needs an even dim >= 4, got {dim=}")
        self.dim = dim

    def forward(self, x: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Steps (B,) -> (B, dim), computed in `dtype` (same values as the reference in float32)."""
        half = self.dim // 2
        step = math.log(10000) / (half - 1)
        freqs = torch.exp(torch.arange(half, device=x.device, dtype=dtype) * -step)  # (half,)
        angles = x.to(dtype)[:, None] * freqs[None, :]  # (B, half)
        return torch.cat((angles.sin(), angles.cos()), dim=-1)  # (B, dim)


class Conv1dBlock(nn.Module):
    """Conv1d (same padding) -> GroupNorm -> Mish, on (B, C, T)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, n_groups: int = 8):
        super().__init__()
        self.block = nn.Sequential(
            nn.Conv1d(in_channels, out_channels, kernel_size, padding=kernel_size // 2),
            nn.GroupNorm(n_groups, out_channels),
            nn.Mish(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


class Downsample1d(nn.Module):
    """Halve T with a strided conv: (B, C, T) -> (B, C, ceil(T / 2))."""

    def __init__(self, dim: int):
        super().__init__()
        self.conv = nn.Conv1d(dim, dim, 3, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample1d(nn.Module):
    """Double T with a transposed conv: (B, C, T) -> (B, C, 2T)."""

    def __init__(self, dim: int):
        super().__init__()
        self.conv = nn.ConvTranspose1d(dim, dim, 4, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class ConditionalResidualBlock1D(nn.Module):
    """Two Conv1dBlocks with FiLM from `cond` between them, plus a (1x1 conv) skip."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        cond_dim: int,
        kernel_size: int = 3,
        n_groups: int = 8,
        cond_predict_scale: bool = False,
    ):
        super().__init__()
        self.blocks = nn.ModuleList(
            [
                Conv1dBlock(in_channels, out_channels, kernel_size, n_groups=n_groups),
                Conv1dBlock(out_channels, out_channels, kernel_size, n_groups=n_groups),
            ]
        )
        # FiLM (https://arxiv.org/abs/1709.07871): per-channel scale and bias, or bias only.
        cond_channels = out_channels * 2 if cond_predict_scale else out_channels
        self.cond_predict_scale = cond_predict_scale
        self.out_channels = out_channels
        self.cond_encoder = nn.Sequential(
            nn.Mish(),
            nn.Linear(cond_dim, cond_channels),
            nn.Unflatten(1, (cond_channels, 1)),  # (B, Cc) -> (B, Cc, 1), broadcast over T
        )
        self.residual_conv = (
            nn.Conv1d(in_channels, out_channels, 1)
            if in_channels != out_channels
            else nn.Identity()
        )

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """x (B, C_in, T), cond (B, cond_dim) -> (B, C_out, T)."""
        out = self.blocks[0](x)
        embed = self.cond_encoder(cond)
        if self.cond_predict_scale:
            # The first C channels are the scale, the next C the bias (reference order).
            embed = embed.reshape(embed.shape[0], 2, self.out_channels, 1)  # (B, 2, C, 1)
            out = embed[:, 0] * out + embed[:, 1]
        else:
            out = out + embed
        out = self.blocks[1](out)
        return out + self.residual_conv(x)


class ConditionalUnet1D(nn.Module):
    """Noise (or sample) predictor eps(x_t, t, global_cond) over an action chunk (B, T, A).

    T must be divisible by 2 ** (len(down_dims) - 1): the last level does not downsample.
    """

    def __init__(
        self,
        input_dim: int,
        global_cond_dim: int,
        diffusion_step_embed_dim: int = 256,
        down_dims: Sequence[int] = (256, 512, 1024),
        kernel_size: int = 5,
        n_groups: int = 8,
        cond_predict_scale: bool = True,
    ):
        super().__init__()
        if len(down_dims) < 1:
            raise ValueError(f"down_dims needs at least one level, got {down_dims=}")
        all_dims = [input_dim, *down_dims]
        start_dim = down_dims[0]
        dsed = diffusion_step_embed_dim
        cond_dim = dsed + global_cond_dim
        in_out = list(zip(all_dims[:-1], all_dims[1:], strict=True))
        self.n_down = len(in_out) - 1  # levels that halve T

        def res_block(dim_in: int, dim_out: int) -> ConditionalResidualBlock1D:
            return ConditionalResidualBlock1D(
                dim_in,
                dim_out,
                cond_dim=cond_dim,
                kernel_size=kernel_size,
                n_groups=n_groups,
                cond_predict_scale=cond_predict_scale,
            )

        self.diffusion_step_encoder = nn.Sequential(
            SinusoidalPosEmb(dsed),
            nn.Linear(dsed, dsed * 4),
            nn.Mish(),
            nn.Linear(dsed * 4, dsed),
        )

        self.down_modules = nn.ModuleList()
        for ind, (dim_in, dim_out) in enumerate(in_out):
            is_last = ind == len(in_out) - 1
            self.down_modules.append(
                nn.ModuleList(
                    [
                        res_block(dim_in, dim_out),
                        res_block(dim_out, dim_out),
                        Downsample1d(dim_out) if not is_last else nn.Identity(),
                    ]
                )
            )

        mid_dim = all_dims[-1]
        self.mid_modules = nn.ModuleList([res_block(mid_dim, mid_dim), res_block(mid_dim, mid_dim)])

        # One up level per down level that halved T, so every up level upsamples (the
        # reference's `is_last` test on this path never fires; no Identity is ever built).
        self.up_modules = nn.ModuleList()
        for dim_in, dim_out in reversed(in_out[1:]):
            self.up_modules.append(
                nn.ModuleList(
                    [
                        res_block(dim_out * 2, dim_in),  # input is cat(x, skip)
                        res_block(dim_in, dim_in),
                        Upsample1d(dim_in),
                    ]
                )
            )

        # Reference quirk kept on purpose: this block uses the default 8 groups, not `n_groups`
        # (same parameter shapes either way, but a different output when n_groups != 8).
        self.final_conv = nn.Sequential(
            Conv1dBlock(start_dim, start_dim, kernel_size=kernel_size),
            nn.Conv1d(start_dim, input_dim, 1),
        )

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | int | float,
        global_cond: torch.Tensor,
    ) -> torch.Tensor:
        """Predict from sample (B, T, A), timestep (B,) / 0-d / number, global_cond (B, G).

        Returns (B, T, A).
        """
        B, T, _ = sample.shape
        if T % (2**self.n_down):
            levels = self.n_down + 1
            raise ValueError(f"horizon must be divisible by {2**self.n_down} ({levels=}), got {T=}")
        if not torch.is_tensor(timestep):
            # A plain number becomes a long like in the reference (a float step is truncated).
            timestep = torch.tensor([timestep], dtype=torch.long)
        elif timestep.ndim == 0:
            timestep = timestep[None]
        timesteps = timestep.to(sample.device).expand(B)  # (B,)

        # The sinusoid runs in at least float32 even for a half-precision model: in bf16 the
        # angle t * f is off by ~0.5 rad at t ~ 100. Its output is then cast to the MLP's dtype.
        sinusoid, mlp = self.diffusion_step_encoder[0], self.diffusion_step_encoder[1:]
        mlp_dtype = mlp[0].weight.dtype
        angles_dtype = torch.promote_types(mlp_dtype, torch.float32)
        step_embed = mlp(sinusoid(timesteps, dtype=angles_dtype).to(mlp_dtype))  # (B, dsed)
        cond = torch.cat([step_embed, global_cond], dim=-1)  # (B, dsed + G)

        x = sample.transpose(1, 2)  # (B, A, T): convolutions run over time
        skips = []
        for resnet, resnet2, downsample in self.down_modules:
            x = resnet2(resnet(x, cond), cond)
            skips.append(x)
            x = downsample(x)

        for mid_module in self.mid_modules:
            x = mid_module(x, cond)

        # Reference quirk kept on purpose: skips are popped from the end, so the deepest skip
        # (same T as the mid output) goes first and the full-resolution skips[0] is never used.
        # The up-path channel counts (dim_out * 2) depend on this pairing.
        for resnet, resnet2, upsample in self.up_modules:
            x = torch.cat((x, skips.pop()), dim=1)  # (B, 2C, T_level)
            x = resnet2(resnet(x, cond), cond)
            x = upsample(x)

        x = self.final_conv(x)  # (B, A, T)
        return x.transpose(1, 2)  # (B, T, A)
