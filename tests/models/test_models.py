"""Tests for the models package: shapes, Opacus readiness, errors, ModelSpec round trip."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from opacus import GradSampleModule, PrivacyEngine
from opacus.validators import ModuleValidator
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from models import MODELS, ModelSpec, build_model
from models.transformer import default_patch_size

# Known, harmless Opacus warnings: secure RNG off in tests; full backward hooks on the first layer.
pytestmark = [
    pytest.mark.filterwarnings("ignore:Secure RNG turned off"),
    pytest.mark.filterwarnings("ignore:Full backward hook is firing"),
]

NAMES = ["cnn", "cnn-lstm", "transformer"]
SIZES = {2: (32, 32), 3: (8, 32, 32)}


def _build(name: str, spatial_dims: int, num_classes: int = 2, in_channels: int = 1) -> nn.Module:
    return build_model(
        name,
        spatial_dims=spatial_dims,
        in_channels=in_channels,
        num_classes=num_classes,
        image_size=SIZES[spatial_dims],
    )


def _batch(spatial_dims: int, batch: int, in_channels: int = 1) -> torch.Tensor:
    return torch.randn(batch, in_channels, *SIZES[spatial_dims])


def test_registry_holds_exactly_the_three_families() -> None:
    assert sorted(MODELS) == ["cnn", "cnn-lstm", "transformer"]


@pytest.mark.parametrize("num_classes", [2, 5])
@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("name", NAMES)
def test_forward_returns_logits_tensor(name: str, spatial_dims: int, num_classes: int) -> None:
    # Prepare
    torch.manual_seed(0)
    model = _build(name, spatial_dims, num_classes, in_channels=2)
    x = _batch(spatial_dims, batch=3, in_channels=2)

    # Execute
    logits = model(x)

    # Assert
    assert type(logits) is torch.Tensor
    assert logits.shape == (3, num_classes)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("name", NAMES)
def test_model_passes_opacus_validator_without_in_place_modules(
    name: str, spatial_dims: int
) -> None:
    # Prepare
    model = _build(name, spatial_dims)

    # Execute
    problems = ModuleValidator.validate(model, strict=False)
    in_place = [n for n, m in model.named_modules() if getattr(m, "inplace", False)]

    # Assert
    assert problems == []
    assert in_place == []


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("name", NAMES)
def test_one_dp_sgd_step_updates_every_trainable_parameter(name: str, spatial_dims: int) -> None:
    # Prepare
    torch.manual_seed(0)
    model = _build(name, spatial_dims)
    x, y = _batch(spatial_dims, batch=8), torch.randint(0, 2, (8,))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    private_model, optimizer, loader = PrivacyEngine().make_private(
        module=model,
        optimizer=optimizer,
        data_loader=DataLoader(TensorDataset(x, y), batch_size=4),
        noise_multiplier=1.0,
        max_grad_norm=1.0,
    )
    xb, yb = next((xb, yb) for xb, yb in loader if len(xb) > 0)  # Poisson batches may be empty
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    before = {n: p.detach().clone() for n, p in trainable.items()}

    # Execute
    optimizer.zero_grad()
    F.cross_entropy(private_model(xb), yb).backward()
    grad_sample_shapes = {
        n: None if p.grad_sample is None else tuple(p.grad_sample.shape)
        for n, p in trainable.items()
    }
    optimizer.step()

    # Assert
    assert grad_sample_shapes == {n: (len(xb), *p.shape) for n, p in trainable.items()}
    assert [n for n, p in trainable.items() if torch.equal(p, before[n])] == []
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("name", NAMES)
def test_per_sample_gradients_match_gradients_of_each_sample_alone(
    name: str, spatial_dims: int
) -> None:
    # Prepare
    torch.manual_seed(0)
    model = _build(name, spatial_dims)
    x, y = _batch(spatial_dims, batch=3), torch.tensor([0, 1, 1])
    model.zero_grad()
    F.cross_entropy(model(x[1:2]), y[1:2], reduction="sum").backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    grad_sample_module = GradSampleModule(model, loss_reduction="sum")

    # Execute
    F.cross_entropy(grad_sample_module(x), y, reduction="sum").backward()

    # Assert
    for n, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad_sample[1], expected[n], atol=1e-5, rtol=1e-4)


def test_cnn_lstm_treats_a_2d_image_as_a_sequence_of_one_slice() -> None:
    # Prepare
    torch.manual_seed(0)
    model = _build("cnn-lstm", 2)
    x = _batch(2, batch=2)

    # Execute
    logits = model(x)
    output, _ = model.lstm(model.encoder(x).unsqueeze(1))
    expected = model.head(output[:, -1])

    # Assert
    torch.testing.assert_close(logits, expected)


@pytest.mark.parametrize(("spatial_dims", "shape"), [(2, (2, 1, 8, 32, 32)), (3, (2, 1, 32, 32))])
def test_cnn_lstm_rejects_input_of_the_wrong_rank(
    spatial_dims: int, shape: tuple[int, ...]
) -> None:
    model = _build("cnn-lstm", spatial_dims)

    with pytest.raises(ValueError, match=r"expects input \(B, C"):
        model(torch.zeros(shape))


@pytest.mark.parametrize(
    ("image_size", "expected"),
    [((64, 64), (4, 4)), ((28, 28), (4, 4)), ((16, 64, 64), (4, 8, 8)), ((28, 28, 28), (4, 7, 7))],
)
def test_default_patch_size_divides_the_image(
    image_size: tuple[int, ...], expected: tuple[int, ...]
) -> None:
    assert default_patch_size(image_size) == expected


def test_transformer_freezes_only_the_unused_cross_attention_norms() -> None:
    model = _build("transformer", 2)

    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]

    assert frozen == [
        f"blocks.{i}.norm_cross_attn.{k}" for i in range(3) for k in ("weight", "bias")
    ]


@pytest.mark.parametrize("name", NAMES)
def test_opacus_uses_functorch_only_for_small_modules(name: str) -> None:
    # functorch re-runs a module per sample: it must never cover a whole network.
    model = _build(name, 2)

    GradSampleModule(model)
    functorch = sorted(
        type(m).__name__ for m in model.modules() if hasattr(m, "ft_compute_sample_grad")
    )

    assert functorch == (["ClassToken", "PatchEmbeddingBlock"] if name == "transformer" else [])


def test_transformer_head_has_no_tanh() -> None:
    model = _build("transformer", 2)

    assert not any(isinstance(m, nn.Tanh) for m in model.modules())


def test_unknown_model_name_suggests_the_closest() -> None:
    with pytest.raises(ValueError) as error:
        build_model("cnnn", spatial_dims=2, in_channels=1, num_classes=2, image_size=(32, 32))

    assert str(error.value) == (
        "unknown model 'cnnn'; did you mean 'cnn'? Known models: cnn, cnn-lstm, transformer"
    )


def test_unknown_option_suggests_the_closest() -> None:
    with pytest.raises(ValueError, match="did you mean 'widths'"):
        build_model(
            "cnn", spatial_dims=2, in_channels=1, num_classes=2, image_size=(32, 32), width=(8,)
        )


@pytest.mark.parametrize(
    ("name", "changes", "message"),
    [
        ("cnn", {"spatial_dims": 4}, "spatial_dims must be 2 .* or 3"),
        ("cnn", {"spatial_dims": True}, "spatial_dims must be 2"),
        ("cnn-lstm", {"num_classes": 1}, "num_classes must be an int of at least 2"),
        ("transformer", {"in_channels": 0}, "in_channels must be a positive int"),
        ("cnn", {"image_size": (32,)}, r"image_size must have 2 entries \(H, W\)"),
        ("cnn", {"spatial_dims": 3}, r"image_size must have 3 entries \(D, H, W\)"),
        ("cnn", {"image_size": (32, 0)}, "image_size must hold positive ints"),
        ("cnn", {"image_size": "32x32"}, "image_size must be a tuple"),
        ("cnn", {"widths": (8,) * 7}, "too small for 7 stages.*at least 64.*pass fewer widths"),
        ("cnn", {"widths": (16, -32)}, "widths must hold positive ints"),
        ("cnn-lstm", {"hidden_size": 0}, "hidden_size must be a positive int"),
        ("transformer", {"patch_size": 5}, r"patch_size \(5, 5\) must divide image_size"),
        ("transformer", {"patch_size": (4, 4, 4)}, "patch_size must have 2 entries"),
        ("transformer", {"hidden_size": 30}, r"hidden_size \(30\) must be divisible by num_heads"),
        ("transformer", {"dropout_rate": 1.0}, r"dropout_rate must be in \[0, 1\)"),
    ],
)
def test_invalid_arguments_raise_a_helpful_value_error(
    name: str, changes: dict[str, Any], message: str
) -> None:
    kwargs: dict[str, Any] = {
        "spatial_dims": 2,
        "in_channels": 1,
        "num_classes": 2,
        "image_size": (32, 32),
    }
    kwargs.update(changes)

    with pytest.raises(ValueError, match=message):
        build_model(name, **kwargs)


@pytest.mark.parametrize(
    ("name", "spatial_dims", "options"),
    [
        ("cnn", 2, {"widths": (8, 16)}),
        ("cnn", 3, {}),
        ("cnn-lstm", 3, {"encoder_widths": (8, 16), "hidden_size": 16}),
        ("transformer", 2, {"patch_size": (8, 4), "hidden_size": 32, "num_layers": 1}),
        ("transformer", 3, {"patch_size": (2, 8, 8), "mlp_dim": 64}),
    ],
)
def test_model_spec_round_trips_through_json_and_rebuilds_the_same_model(
    name: str, spatial_dims: int, options: dict[str, Any]
) -> None:
    # Prepare
    spec = ModelSpec(name, spatial_dims, 1, 3, SIZES[spatial_dims], options)
    model = build_model(
        name,
        spatial_dims=spatial_dims,
        in_channels=1,
        num_classes=3,
        image_size=SIZES[spatial_dims],
        **options,
    )

    # Execute
    restored = ModelSpec.from_dict(json.loads(json.dumps(spec.to_dict())))
    rebuilt = restored.build()

    # Assert
    assert restored == spec
    assert isinstance(restored.image_size, tuple)
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {
        k: v.shape for k, v in model.state_dict().items()
    }
    assert rebuilt(_batch(spatial_dims, batch=2)).shape == (2, 3)


def test_model_spec_to_dict_is_plain_json() -> None:
    spec = ModelSpec("cnn", 2, 1, 2, [28, 28], {"widths": [8, 16]})

    data = spec.to_dict()

    assert data == {
        "name": "cnn",
        "spatial_dims": 2,
        "in_channels": 1,
        "num_classes": 2,
        "image_size": [28, 28],
        "options": {"widths": [8, 16]},
    }
    assert spec.image_size == (28, 28) and spec.options == {"widths": (8, 16)}


@pytest.mark.parametrize(
    ("changes", "removed", "message"),
    [
        ({}, "image_size", r"missing: \['image_size'\]"),
        ({"depth": 3}, None, r"unexpected: \['depth'\]"),
        ({"name": "vit"}, None, "unknown model 'vit'"),
        ({"options": {"depth": 3}}, None, "unknown option 'depth'"),
        ({"num_classes": 1}, None, "num_classes must be an int of at least 2"),
    ],
)
def test_model_spec_rejects_bad_dicts(
    changes: dict[str, Any], removed: str | None, message: str
) -> None:
    data = ModelSpec("cnn", 2, 1, 2, (32, 32)).to_dict() | changes
    if removed is not None:
        del data[removed]

    with pytest.raises(ValueError, match=message):
        ModelSpec.from_dict(data)
