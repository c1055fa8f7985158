"""Every model by name: shapes, the two-moons MLP's init, and refusal of unknown names."""

import pytest
import torch

from mpl_fast.models import create_model


@pytest.mark.parametrize("name,shape,in_ch", [("digits-cnn", (4, 1, 8, 8), 1), ("two-moons-mlp", (4, 2), 1),
                                             ("wrn28-2", (2, 3, 32, 32), 3)])
def test_forward_shapes(name, shape, in_ch):
    model = create_model(name, 10 if name != "two-moons-mlp" else 2, dropout=0.2, in_channels=in_ch)
    out = model(torch.randn(shape))
    assert out.shape == (shape[0], 10 if name != "two-moons-mlp" else 2)
    out.sum().backward()


def test_wrn_sizes():
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert 1.4e6 < count(create_model("wrn28-2", 10)) < 1.6e6      # the paper's 1.5M
    assert 23e6 < count(create_model("wrn28-8", 100)) < 24e6


def test_two_moons_mlp_is_the_papers():
    model = create_model("two-moons-mlp", 2)
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(2, 8), (8, 8), (8, 2)]
    assert sum(isinstance(m, torch.nn.Sigmoid) for m in model.modules()) == 2
    assert all(p.abs().max() <= 0.1 for p in model.parameters())


def test_timm_by_name_without_download():
    model = create_model("resnet18", 7, in_channels=3)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 7)


def test_unknown_model_is_refused():
    with pytest.raises(ValueError, match="unknown model"):
        create_model("vgg16", 10)
    with pytest.raises(ValueError, match="unknown timm model"):
        create_model("resnet_does_not_exist", 10)
