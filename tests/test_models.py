import pytest
import torch

from dynal.models import MODELS, model_factory


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("shape", [(1, 8, 8), (3, 13, 17)])
def test_models_expose_features_and_head(name, shape):
    model = model_factory(name, shape, 7, **({} if name in ("mlp", "cnn") else {"width": 0.125}))()
    model.eval()
    x = torch.randn(2, *shape)
    h = model.features(x)
    assert h.shape == (2, model.head.in_features)
    assert model(x).shape == (2, 7)
    torch.testing.assert_close(model(x), model.head(h))


def test_width_multiplier_scales_resnet():
    small = model_factory("resnet18", (3, 32, 32), 10, width=0.5)()
    full = model_factory("resnet18", (3, 32, 32), 10)()
    assert small.head.in_features == 256 and full.head.in_features == 512


def test_bad_model_arguments():
    with pytest.raises(ValueError, match="unknown model"):
        model_factory("alexnet", (3, 32, 32), 10)
    with pytest.raises(ValueError, match=r"\(C, H, W\)"):
        model_factory("cnn", (64,), 10)


@pytest.mark.parametrize(
    "name, params, message",
    [
        ("resnet18", {"width": 0}, "width must be a positive number"),
        ("vgg11", {"width": -1.0}, "width must be a positive number"),
        ("resnet18", {"width": float("inf")}, "width must be a positive number"),
        ("cnn", {"width": 0.25}, "positive integer"),
        ("cnn", {"hidden": 0}, "hidden must be a positive integer"),
        ("mlp", {"hidden": 128}, "list of positive layer widths"),
        ("mlp", {"hidden": [0]}, "list of positive layer widths"),
        ("mlp", {"dropout": -0.1}, r"dropout must be a number in \[0, 1\)"),
        ("cnn", {"dropout": True}, "dropout must be a number"),
        ("resnet18", {"dropout": "0.3"}, "dropout must be a number"),
    ],
)
def test_model_options_are_checked(name, params, message):
    with pytest.raises(ValueError, match=message):
        model_factory(name, (1, 8, 8) if name != "mlp" else (6,), 3, **params)


def test_building_a_factory_leaves_torchs_generator_alone():
    state = torch.random.get_rng_state()
    model_factory("resnet18", (3, 8, 8), 4, width=0.25)
    assert torch.equal(torch.random.get_rng_state(), state)
