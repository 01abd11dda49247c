import pytest
import torch
import torchvision

from trainer.models import ModelError, build_model


@pytest.fixture(scope="module")
def resnet18_file(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "resnet18.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
    return path


def test_cross_modality_init_averages_rgb_filters_over_2L_channels(resnet18_file):
    sd = torch.load(resnet18_file, weights_only=True)
    model = build_model("resnet18", num_classes=7, in_channels=20, pretrained=resnet18_file)
    w = model.conv1.weight.detach()
    assert w.shape == (64, 20, 7, 7)
    expected = sd["conv1.weight"].mean(dim=1)
    for c in range(20):
        assert torch.allclose(w[:, c], expected)
    assert torch.equal(model.layer4[1].conv2.weight, sd["layer4.1.conv2.weight"])  # the rest loaded as is
    assert model.fc.out_features == 7 and model(torch.zeros(2, 20, 32, 32)).shape == (2, 7)


def test_spatial_model_loads_rgb_weights_and_new_head(resnet18_file):
    sd = torch.load(resnet18_file, weights_only=True)
    model = build_model("resnet18", num_classes=3, pretrained=resnet18_file, dropout=0.3)
    assert torch.equal(model.conv1.weight, sd["conv1.weight"])
    assert model.fc.p == 0.3 and model.fc.out_features == 3


def test_vgg16_bn_temporal_first_conv_and_classifier():
    model = build_model("vgg16_bn", num_classes=5, in_channels=6, dropout=0.2)
    assert model.features[0].in_channels == 6
    assert model.classifier[6].out_features == 5
    assert all(m.p == 0.2 for m in model.classifier if isinstance(m, torch.nn.Dropout))


def test_unknown_arch_lists_the_choices():
    with pytest.raises(ModelError, match="unknown architecture 'resnet9'.*resnet50"):
        build_model("resnet9", 2)


def test_missing_or_mismatched_weights_file(tmp_path, resnet18_file):
    with pytest.raises(ModelError, match="does not exist"):
        build_model("resnet18", 2, pretrained=tmp_path / "nope.pth")
    with pytest.raises(ModelError, match="does not fit resnet50"):
        build_model("resnet50", 2, pretrained=resnet18_file)
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ModelError, match="not a readable"):
        build_model("resnet18", 2, pretrained=junk)
