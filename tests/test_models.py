import pytest
import torch

from sensprune.models import MODELS, build_model, prunable_weights


def n_params(m):
    return sum(p.numel() for p in m.parameters())


@pytest.mark.parametrize("name,count,weights", [
    ("lenet300", 266_610, 266_200),
    ("lenet5", 431_080, 430_500),
])
def test_paper_networks_counts(name, count, weights):
    m = build_model(name)
    assert n_params(m) == count
    assert sum(p.numel() for p in prunable_weights(m).values()) == weights
    assert m(torch.randn(2, 1, 28, 28)).shape == (2, 10)


def test_vgg16_imagenet_count():
    m = build_model("vgg16", 1000, (3, 224, 224))
    assert n_params(m) == 138_357_544


def test_cifar_models_forward():
    for name in ("vgg16_cifar", "resnet32"):
        m = build_model(name, 10, (3, 32, 32))
        assert m(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    # ResNet-32: 0.46 M parameters (He et al. 2016, Table 6)
    assert abs(n_params(build_model("resnet32", 10, (3, 32, 32))) - 0.46e6) < 0.01e6


@pytest.mark.parametrize("name", ["convbn", "lstm"])
def test_generality_models(name):
    m = build_model(name)
    assert m(torch.randn(3, 1, 28, 28)).shape == (3, 10)
    assert prunable_weights(m)  # has weights the method can prune


def test_unknown_model():
    from sensprune.errors import ConfigError
    with pytest.raises(ConfigError, match="unknown model 'lenet'"):
        build_model("lenet")
    assert set(MODELS) >= {"lenet300", "lenet5", "vgg16", "vgg16_cifar", "resnet32"}
