"""The ``cnn-lstm`` family: a 2D CNN per slice, an Opacus ``DPLSTM`` over the slices, a linear head.

For a volume ``(B, C, D, H, W)`` the D slices are the sequence. A 2D input ``(B, C, H, W)`` is a
sequence of length 1, so the same model also runs on plain images.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from opacus.layers import DPLSTM
from torch import nn

from models.checks import check_common_args, check_positive_int
from models.cnn import ResNetEncoder, check_widths

__all__ = ["DEFAULT_ENCODER_WIDTHS", "DEFAULT_HIDDEN_SIZE", "CNNLSTMClassifier", "build_cnn_lstm"]

DEFAULT_ENCODER_WIDTHS: tuple[int, ...] = (16, 32)
DEFAULT_HIDDEN_SIZE = 64


class CNNLSTMClassifier(nn.Module):
    """Encode each slice with a 2D CNN, run a ``DPLSTM`` over slices, classify the last state.

    The encoder runs once per slice in a loop, not once on ``x.flatten(0, 1)``: Opacus then sees
    B samples at every layer, so per-sample gradients stay per patient (the flattened call would
    give B * D "samples" in the encoder against B in the LSTM).

    Parameters
    ----------
    spatial_dims : int
        2 (input ``(B, C, H, W)``, one time step) or 3 (input ``(B, C, D, H, W)``, D steps).
    in_channels : int
        Input channels.
    num_classes : int
        Number of logits.
    encoder_widths : Sequence[int]
        Channels of each encoder stage.
    hidden_size : int
        LSTM hidden size.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        num_classes: int,
        encoder_widths: Sequence[int],
        hidden_size: int,
    ):
        super().__init__()
        self.spatial_dims = spatial_dims
        self.encoder = ResNetEncoder(2, in_channels, encoder_widths)
        self.lstm = DPLSTM(self.encoder.num_features, hidden_size, batch_first=True)
        self.head = nn.Linear(hidden_size, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return logits ``(B, num_classes)`` from the LSTM state after the last slice."""
        if x.dim() != self.spatial_dims + 2:
            expected = "(B, C, H, W)" if self.spatial_dims == 2 else "(B, C, D, H, W)"
            raise ValueError(
                f"cnn-lstm built for spatial_dims={self.spatial_dims} expects input {expected}, "
                f"got shape {tuple(x.shape)}"
            )
        if self.spatial_dims == 2:
            x = x.unsqueeze(2)  # one time step
        steps = [self.encoder(x[:, :, t]) for t in range(x.shape[2])]
        sequence = torch.stack(steps, dim=1)  # (B, D, features)
        output, _ = self.lstm(sequence)
        logits: torch.Tensor = self.head(output[:, -1])
        return logits


def build_cnn_lstm(
    *,
    spatial_dims: int,
    in_channels: int,
    num_classes: int,
    image_size: Sequence[int],
    encoder_widths: Sequence[int] = DEFAULT_ENCODER_WIDTHS,
    hidden_size: int = DEFAULT_HIDDEN_SIZE,
) -> nn.Module:
    """Build the per-slice CNN + ``DPLSTM`` classifier.

    Parameters
    ----------
    spatial_dims : int
        2 for ``(B, C, H, W)`` (a sequence of one), 3 for ``(B, C, D, H, W)`` (D slices).
    in_channels : int
        Input channels.
    num_classes : int
        Number of logits, at least 2.
    image_size : Sequence[int]
        ``(H, W)`` or ``(D, H, W)``; the slice size is checked against the encoder's stages.
    encoder_widths : Sequence[int]
        Channels of each 2D encoder stage.
    hidden_size : int
        LSTM hidden size.

    Returns
    -------
    nn.Module
        A :class:`CNNLSTMClassifier`.
    """
    size = check_common_args(
        spatial_dims=spatial_dims,
        in_channels=in_channels,
        num_classes=num_classes,
        image_size=image_size,
    )
    widths = check_widths(encoder_widths, size[-2:])
    check_positive_int("hidden_size", hidden_size)
    return CNNLSTMClassifier(spatial_dims, in_channels, num_classes, widths, hidden_size)
