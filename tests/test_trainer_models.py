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


@pytest.mark.parametrize("arch,channels", [("resnet18", 3), ("resnet18", 20), ("vgg11_bn", 3)])
def test_checkpoint_weights_load_into_plain_torchvision(arch, channels):
    model = build_model(arch, num_classes=7, in_channels=channels, dropout=0.5)
    plain = getattr(torchvision.models, arch)(num_classes=7)
    if channels != 3:  # a flow stream: torchvision's first conv takes the stream's channels
        plain.conv1 = torch.nn.Conv2d(channels, 64, 7, 2, 3, bias=False)
    plain.load_state_dict(model.state_dict())  # strict: same keys, same shapes
    x = torch.randn(2, channels, 64, 64)
    model.eval(), plain.eval()
    assert torch.allclose(model(x), plain(x), atol=1e-5)


def mmaction_names(sd: dict) -> dict:
    """A torchvision ResNet state_dict in MMAction2's ResNet names (ConvModule conv/bn), as a TSN has them."""
    out = {}
    for k, v in sd.items():
        if k.startswith("fc."):
            out["cls_head.fc_cls." + k[3:]] = v
            continue
        k = k.replace("downsample.0.", "downsample.conv.").replace("downsample.1.", "downsample.bn.")
        parts = k.split(".")
        for i, p in enumerate(parts):
            if p.startswith("conv") and p[4:].isdigit():
                parts[i] = f"{p}.conv"
            elif p.startswith("bn") and p[2:].isdigit():
                parts[i] = f"conv{p[2:]}.bn"
        out["backbone." + ".".join(parts)] = v
    return out


def test_mmengine_checkpoint_seeds_either_stream(tmp_path):
    torch.manual_seed(1)
    rgb = torchvision.models.resnet18(weights=None).state_dict()
    path = tmp_path / "tsn_r18_rgb.pth"
    torch.save({"meta": {"epoch": 100}, "state_dict": mmaction_names(rgb)}, path)
    assert "backbone.layer1.0.conv1.conv.weight" in torch.load(path, weights_only=True)["state_dict"]
    spatial = build_model("resnet18", num_classes=3, pretrained=path)
    assert torch.equal(spatial.layer2[0].downsample[1].running_var, rgb["layer2.0.downsample.1.running_var"])
    assert torch.equal(spatial.bn1.weight, rgb["bn1.weight"]) and torch.equal(spatial.conv1.weight, rgb["conv1.weight"])
    temporal = build_model("resnet18", num_classes=3, in_channels=10, pretrained=path)  # cross-modality init
    assert torch.allclose(temporal.conv1.weight[:, 4], rgb["conv1.weight"].mean(1))
    flow_tsn = dict(rgb, **{"conv1.weight": torch.randn(64, 10, 7, 7)})  # a flow TSN: conv1 fits, taken as is
    torch.save({"state_dict": mmaction_names(flow_tsn)}, tmp_path / "tsn_flow.pth")
    temporal = build_model("resnet18", num_classes=3, in_channels=10, pretrained=tmp_path / "tsn_flow.pth")
    assert torch.equal(temporal.conv1.weight, flow_tsn["conv1.weight"])


def test_cnn_m_2048_shapes_for_any_input():
    for channels, crop in ((3, 224), (20, 224), (6, 96)):
        model = build_model("cnn_m_2048", num_classes=5, in_channels=channels).eval()
        assert model(torch.zeros(2, channels, crop, crop)).shape == (2, 5)
    m = build_model("cnn_m_2048", num_classes=5)
    convs = [x for x in m.features if isinstance(x, torch.nn.Conv2d)]
    assert [(c.out_channels, c.kernel_size[0], c.stride[0]) for c in convs] == \
        [(96, 7, 2), (256, 5, 2), (512, 3, 1), (512, 3, 1), (512, 3, 1)]
    linears = [x for x in m.classifier if isinstance(x, torch.nn.Linear)]
    assert [lin.out_features for lin in linears] == [4096, 2048, 5]
    assert sum(isinstance(x, torch.nn.LocalResponseNorm) for x in m.features) == 2
    # at 224 the feature map before full6 is 512 x 6 x 6 as in the paper's net (the adaptive pool is a no-op)
    assert m.features(torch.zeros(1, 3, 224, 224)).shape == (1, 512, 6, 6)


def test_last_layer_only_trains_the_classifier_alone():
    from trainer.models import freeze_backbone

    model = build_model("resnet18", num_classes=4)
    params = freeze_backbone(model, "resnet18")
    assert {id(p) for p in params} == {id(model.fc.weight), id(model.fc.bias)}
    assert not model.conv1.weight.requires_grad and model.fc.weight.requires_grad
