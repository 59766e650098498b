"""Generator / discriminator shapes, parameter counts (the paper's, in docs/paper.md), init, channel-wise FC."""

import pytest
import torch
import torch.nn as nn

from ce_ray.config import ModelConfig
from ce_ray.core.model import (
    ChannelWiseFC,
    DenseConv,
    DenseConvTranspose,
    Generator,
    build_discriminator,
    build_generator,
    conv_macs,
    count_params,
)


def test_paper_parameter_counts_and_macs():
    G, D = build_generator(ModelConfig()), build_discriminator(ModelConfig())
    assert count_params(G) == pytest.approx(71.1e6, rel=0.005)
    assert count_params(D) == pytest.approx(2.77e6, rel=0.005)
    bottleneck = G.bottleneck
    assert bottleneck[0].weight.numel() == 512 * 4000 * 16  # E6: 32.8M
    assert bottleneck[3].weight.numel() == 4000 * 512 * 16  # D1: 32.8M
    assert conv_macs(G, (3, 128, 128)) / 1e9 == pytest.approx(0.35, rel=0.01)
    assert conv_macs(D, (3, 64, 64)) / 1e9 == pytest.approx(0.10, rel=0.05)


CONFIGS = [
    (ModelConfig(bottleneck=32, ngf=8, ndf=8), (3, 64, 64), 64),
    (ModelConfig(variant="full", bottleneck=32, ngf=8, ndf=8), (3, 128, 128), 128),
    (ModelConfig(channel_wise_fc=True, ngf=8, ndf=8), (3, 64, 64), 64),
]


@pytest.mark.parametrize("cfg, out_shape, d_in", CONFIGS, ids=["center", "full", "channel_wise_fc"])
def test_forward_backward(cfg, out_shape, d_in):
    G, D = build_generator(cfg), build_discriminator(cfg)
    x = torch.rand(2, 3, 128, 128) * 2 - 1
    y = G(x)
    assert y.shape == (2, *out_shape)
    assert y.abs().max() <= 1  # tanh output in [-1, 1]
    logits = D(y)
    assert logits.shape == (2,)
    logits.sum().backward()
    assert all(p.grad is not None for p in G.parameters())
    assert D(torch.zeros(2, 3, d_in, d_in)).shape == (2,)


def test_no_conv_biases_and_paper_init():
    G = build_generator(ModelConfig())
    for m in G.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            assert m.bias is None  # the authors zero them every step
    w = G.encoder[1][0].weight
    assert w.std().item() == pytest.approx(0.02, rel=0.1)
    bn = G.encoder[1][1]
    assert bn.weight.mean().item() == pytest.approx(1.0, abs=0.01)
    assert bn.bias.abs().max().item() == 0
    assert isinstance(G.encoder[0][1], nn.LeakyReLU)  # E1 has no BN


def test_dense_bottleneck_equals_plain_convolution():
    conv = DenseConv(16, 10, 4, 1, 0, bias=False)
    x = torch.randn(3, 16, 4, 4)
    assert torch.allclose(conv(x), nn.functional.conv2d(x, conv.weight), atol=1e-5)
    convt = DenseConvTranspose(10, 16, 4, 1, 0, bias=False)
    z = torch.randn(3, 10, 1, 1)
    assert torch.allclose(convt(z), nn.functional.conv_transpose2d(z, convt.weight), atol=1e-5)
    # The fast and the port's layout give the same generator output from the same weights.
    torch.manual_seed(0)
    fast = Generator(bottleneck=32, ngf=8)
    slow = Generator(bottleneck=32, ngf=8, dense_bottleneck=False)
    slow.load_state_dict(fast.state_dict())
    x = torch.rand(2, 3, 128, 128)
    assert torch.allclose(fast(x), slow(x), atol=1e-5)


def test_channel_wise_fc_has_no_cross_channel_weights():
    fc = ChannelWiseFC(256, 6)
    assert fc.weight.numel() == 256 * 6**4 == 331_776  # m n^4 (paper §3.1), vs 84,934,656 for a full FC
    x = torch.zeros(1, 256, 6, 6)
    x[0, 5] = torch.randn(6, 6)
    y = fc(x)
    assert y[0, :5].abs().sum() == 0 and y[0, 6:].abs().sum() == 0  # channel 5 only reaches channel 5


def test_sync_batchnorm_conversion():
    G = nn.SyncBatchNorm.convert_sync_batchnorm(build_generator(ModelConfig(bottleneck=32, ngf=8)))
    assert any(isinstance(m, nn.SyncBatchNorm) for m in G.modules())
    assert not any(type(m) is nn.BatchNorm2d for m in G.modules())


@pytest.mark.parametrize("variant, out", [("center", 64), ("full", 128)])
def test_resize_decoder_has_no_transposed_convs_and_keeps_shapes(variant, out):
    G = build_generator(ModelConfig(variant=variant, upsample="resize", bottleneck=32, ngf=8))
    decoder_layers = list(G.decoder.modules())
    assert not any(isinstance(m, nn.ConvTranspose2d) for m in decoder_layers)
    assert sum(isinstance(m, nn.Upsample) for m in decoder_layers) == (4 if variant == "center" else 5)
    y = G(torch.rand(2, 3, 128, 128) * 2 - 1)
    assert y.shape == (2, 3, out, out) and y.abs().max() <= 1
    y.sum().backward()
    assert all(p.grad is not None for p in G.parameters())


@pytest.mark.parametrize("variant", ["center", "full"])
def test_residual_generator_starts_as_the_identity_on_its_input(variant):
    G = build_generator(ModelConfig(variant=variant, residual=True, bottleneck=32, ngf=8)).eval()
    x = torch.rand(2, 3, 128, 128) * 2 - 1
    with torch.no_grad():
        y = G(x)
    expected = x[:, :, 32:96, 32:96] if variant == "center" else x
    assert torch.equal(y, expected)  # zero-initialised last layer: exactly the fill and the ring
    assert not isinstance(G.decoder[-1], nn.Tanh)
    assert torch.count_nonzero(G.last_conv().weight) == 0
    # ...and it learns: one gradient step moves the output.
    G.train()
    G(x).square().mean().backward()
    assert G.last_conv().weight.grad.abs().sum() > 0


@pytest.mark.parametrize("variant, out", [("center", 64), ("full", 128)])
@pytest.mark.parametrize("upsample", ["transposed", "resize"])
def test_skips_and_mask_input_shapes_and_gradients(variant, out, upsample):
    """U-Net skips (each encoder level concatenated to the decoder level of its size) and the hole
    as a 4th input channel: shapes, every weight trained, the residual still the identity at start."""
    cfg = ModelConfig(
        variant=variant, upsample=upsample, bottleneck=16, ngf=8, skips=True, mask_input=True, residual=True
    )
    G = build_generator(cfg)
    assert G.encoder[0][0].in_channels == 4
    x = torch.rand(2, 4, 128, 128) * 2 - 1
    with torch.no_grad():
        y = G.eval()(x)
    lo = 32 if variant == "center" else 0
    assert y.shape == (2, 3, out, out)
    assert torch.equal(y, x[:, :3, lo : 128 - lo, lo : 128 - lo])  # the correction starts at 0
    G.train()
    nn.init.normal_(G.last_conv().weight, 0, 0.02)
    G(x).square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in G.parameters())
    # The skips reach the decoder: a change in the input's fine detail changes the output there
    # even with the bottleneck's path cut.
    with torch.no_grad():
        G.eval()
        for p in G.bottleneck.parameters():
            p.zero_()
        a, b = G(x), G(x + 0.5 * (torch.rand_like(x) - 0.5))
    assert (a - b).abs().max() > 0


def test_conv_macs_counts_the_mask_channel():
    plain = conv_macs(build_generator(ModelConfig(variant="full", bottleneck=16, ngf=8)))
    masked = conv_macs(build_generator(ModelConfig(variant="full", bottleneck=16, ngf=8, mask_input=True)))
    assert masked > plain
