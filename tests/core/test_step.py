"""The GAN step: the right gradients reach the right weights, precision modes, and learning."""

import copy

import numpy as np
import pytest
import torch
from helpers import TINY_FREEFORM, random_crops

import ce_ray.config as C
from ce_ray.core.losses import discriminator_loss, generator_adversarial_loss, reconstruction_loss
from ce_ray.core.masks import center_hole, center_weights, fill_hole
from ce_ray.core.model import build_discriminator, build_generator
from ce_ray.core.step import GanStep, predict
from ce_ray.data.bundled import load_bundled
from ce_ray.data.crops import resize_shorter
from ce_ray.errors import UserError

TINY = {"model": {"bottleneck": 32, "ngf": 8, "ndf": 8}, "data": {"batch_size": 4}}


def batch(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(n, 3, 128, 128, generator=g) * 2 - 1
    holes = torch.from_numpy(center_hole(128, 4)).float().expand(n, 1, 128, 128).contiguous()
    return images, holes


def test_gradients_are_exactly_each_losss_own():
    cfg = C.from_dict(TINY)
    torch.manual_seed(0)
    G, D = build_generator(cfg.model), build_discriminator(cfg.model)
    G0, D0 = copy.deepcopy(G), copy.deepcopy(D)
    images, holes = batch()
    GanStep(G, D, cfg, torch.device("cpu"))(images, holes)

    # Reference: L_D's gradient w.r.t. D only, L_G's gradient w.r.t. G only (train.lua's maths).
    target = images[:, :, 32:96, 32:96]
    fake = G0(fill_hole(images, holes))
    real_logits, fake_logits = D0(target), D0(fake)
    loss_d, _ = discriminator_loss(real_logits, fake_logits)
    loss_g = (
        generator_adversarial_loss(fake_logits, cfg.loss.lambda_adv)[0]
        + reconstruction_loss(fake, target, center_weights(128, 4, 0.999, 10.0))[0]
    )
    ref_d = torch.autograd.grad(loss_d, list(D0.parameters()), retain_graph=True)
    ref_g = torch.autograd.grad(loss_g, list(G0.parameters()))
    for p, r in zip(D.parameters(), ref_d):
        assert torch.allclose(p.grad, r, atol=1e-6, rtol=1e-4)
    for p, r in zip(G.parameters(), ref_g):
        assert torch.allclose(p.grad, r, atol=1e-6, rtol=1e-4)


def test_step_updates_both_models():
    cfg = C.from_dict(TINY)
    G, D = build_generator(cfg.model), build_discriminator(cfg.model)
    g0 = [p.detach().clone() for p in G.parameters()]
    d0 = [p.detach().clone() for p in D.parameters()]
    m = GanStep(G, D, cfg, torch.device("cpu"))(*batch())
    assert all(not torch.equal(a, p) for a, p in zip(g0, G.parameters()))
    assert all(not torch.equal(a, p) for a, p in zip(d0, D.parameters()))
    assert set(m) >= {"loss_d", "loss_g", "loss_rec", "loss_g_adv", "d_real", "d_fake"}
    assert all(torch.isfinite(v) for v in m.values())


def test_lambda_adv_zero_leaves_generator_gradient_purely_reconstruction():
    cfg = C.from_dict({**TINY, "loss": {"lambda_adv": 0.0}})
    G, D = build_generator(cfg.model), build_discriminator(cfg.model)
    G0 = copy.deepcopy(G)
    images, holes = batch()
    D0 = copy.deepcopy(D)
    m = GanStep(G, D, cfg, torch.device("cpu"))(images, holes)
    # Nothing depends on D: it is neither run nor updated, and no D metric is reported (a NaN read as a failure).
    assert all(torch.equal(a, b) for a, b in zip(D.parameters(), D0.parameters()))
    assert all(p.grad is None for p in D.parameters())
    assert not {"loss_d", "d_real", "d_fake", "loss_g_adv"} & set(m) and m["loss_g"] == m["loss_rec"]
    fake = G0(fill_hole(images, holes))
    ref = torch.autograd.grad(
        reconstruction_loss(fake, images[:, :, 32:96, 32:96], center_weights(128, 4, 0.999, 10.0))[0],
        list(G0.parameters()),
    )
    for p, r in zip(G.parameters(), ref):
        assert torch.allclose(p.grad, r, atol=1e-6, rtol=1e-4)


def test_full_variant_step():
    cfg = C.from_dict({**TINY, "model": {**TINY["model"], "variant": "full"}, "mask": {"kind": "random_block"}})
    G, D = build_generator(cfg.model), build_discriminator(cfg.model)
    images, _ = batch()
    holes = torch.zeros(4, 1, 128, 128)
    holes[:, :, 10:40, 50:90] = 1
    m = GanStep(G, D, cfg, torch.device("cpu"))(images, holes)
    assert torch.isfinite(m["loss_g"])


def test_bf16_runs_on_cpu_and_fp16_needs_a_gpu():
    cfg = C.from_dict({**TINY, "train": {"precision": "bf16"}})
    G, D = build_generator(cfg.model), build_discriminator(cfg.model)
    m = GanStep(G, D, cfg, torch.device("cpu"))(*batch())
    assert all(torch.isfinite(v) for v in m.values())
    cfg16 = C.from_dict({**TINY, "train": {"precision": "fp16"}})
    with pytest.raises(UserError, match="fp16"):
        GanStep(G, D, cfg16, torch.device("cpu"))


def test_predict_keeps_pixels_outside_the_hole():
    cfg = C.from_dict(TINY)
    G = build_generator(cfg.model)
    images, holes = batch()
    out = predict(G, images, holes, cfg)
    keep = ~holes.bool().expand_as(images)
    assert torch.equal(out[keep], images[keep])
    assert not torch.equal(out, images)
    assert G.training  # predict restores the mode it found


def real_crops(n: int) -> torch.Tensor:
    rng = np.random.default_rng(0)
    photos = load_bundled()[:n]
    return torch.from_numpy(
        np.stack([random_crops(resize_shorter(rgb, 350), 128, 1, rng, False)[0] for _, rgb in photos])
    )


def test_reconstruction_loss_falls_on_a_fixed_batch():
    """Quality must not regress for speed: default precision, a few dozen steps, clear drop."""
    torch.manual_seed(0)
    cfg = C.from_dict({"model": {"bottleneck": 128, "ngf": 16, "ndf": 16}, "data": {"batch_size": 8}})
    G, D = build_generator(cfg.model), build_discriminator(cfg.model)
    step = GanStep(G, D, cfg, torch.device("cpu"))
    images = real_crops(8)
    holes = torch.from_numpy(center_hole(128, 4)).float().expand(8, 1, 128, 128).contiguous()
    losses = [step(images, holes)["loss_rec"].item() for _ in range(40)]
    assert np.mean(losses[-5:]) < 0.3 * np.mean(losses[:3]), losses


def test_linear_lr_decay_holds_then_falls_to_zero_and_is_set_on_both_optimisers():
    from ce_ray.core.step import lr_factor

    o = C.OptimConfig(lr_decay="linear", decay_fraction=0.25)
    f = [lr_factor(o, s, 100) for s in range(100)]
    assert f[:75] == [1.0] * 75  # held for the first 75 updates
    assert f[75] == 1.0 and f[99] == pytest.approx(0.04)  # then 1, 0.96, ..., 0.04 over the last 25
    assert all(a > b for a, b in zip(f[75:], f[76:]))
    assert lr_factor(C.OptimConfig(), 99, 100) == 1.0  # "none": train.lua's constant rates

    cfg = C.from_dict(TINY)
    stepper = GanStep(build_generator(cfg.model), build_discriminator(cfg.model, 128), cfg, torch.device("cpu"))
    stepper.set_lr_scale(0.5)
    assert stepper.lrs() == {"lr_g": pytest.approx(cfg.optim.lr_g / 2), "lr_d": pytest.approx(cfg.optim.lr_d / 2)}


def test_compact_batches_expand_to_exactly_the_float_form():
    import numpy as np

    from ce_ray.config import MaskConfig
    from ce_ray.core.masks import holes_for
    from ce_ray.core.pixels import to_unit
    from ce_ray.core.step import prepare_batch
    from ce_ray.data.crops import pack_holes

    rng = np.random.default_rng(0)
    u8 = rng.integers(0, 256, (5, 128, 128, 3), dtype=np.uint8)
    holes = holes_for(MaskConfig(kind="random_region"), 128, 5, rng)  # (5, 1, 128, 128) float32
    chw = np.ascontiguousarray(u8.transpose(0, 3, 1, 2))
    images, h = prepare_batch(torch.from_numpy(chw), torch.from_numpy(pack_holes(holes)), 128, torch.device("cpu"))
    assert torch.equal(h, torch.from_numpy(holes))
    assert torch.allclose(images, torch.from_numpy(np.stack([to_unit(x) for x in u8])), atol=1e-6)
    # Already in the step's form: passed through.
    f, hh = prepare_batch(images, h, 128, torch.device("cpu"))
    assert torch.equal(f, images) and torch.equal(hh, h)
    assert pack_holes(holes).nbytes * 32 == holes.nbytes and chw.nbytes * 4 == images.numpy().nbytes


FREEFORM = {**TINY_FREEFORM, "data": {"batch_size": 4}}


def stroke_batch(n=4, seed=0):
    """Real photo crops (the fill of noise is a harder problem than any photo poses) and medium strokes."""
    from ce_ray.core.strokes import stroke_hole

    rng = np.random.default_rng(seed)
    photos = [resize_shorter(rgb, 200) for _, rgb in load_bundled()]
    images = torch.from_numpy(
        np.stack([random_crops(photos[i % len(photos)], 128, 1, rng, False)[0] for i in range(n)])
    )
    holes = torch.from_numpy(np.stack([stroke_hole("medium", 128, 128, rng) for _ in range(n)]))[:, None].float()
    return images, holes


def test_free_form_inputs_carry_the_hole_and_its_harmonic_fill():
    from ce_ray.core.masks import harmonic_fill_exact

    cfg = C.from_dict(FREEFORM)
    step = GanStep(build_generator(cfg.model), build_discriminator(cfg.model), cfg, torch.device("cpu"))
    images, holes = stroke_batch()
    x, target, weights, h = step.inputs(images, holes)
    assert x.shape == (4, 4, 128, 128)
    assert torch.equal(x[:, 3:], holes * 2 - 1)  # +1 in the hole, -1 elsewhere
    err = (x[:, :3] - harmonic_fill_exact(images, holes.bool())).abs()[holes.bool().expand_as(images)]
    assert err.mean() < 6 / 255  # the training fill (the multigrid start alone): within ~3 grey levels on average
    assert torch.equal(weights, holes * cfg.loss.lambda_rec)  # overlap_weight 0: the loss sees the hole only
    assert torch.equal(target, images)


def test_free_form_discriminator_judges_the_composite():
    """With the loss on the hole only, G's context output is never trained: D sees the generated
    hole pasted into the real context, what inference returns."""
    cfg = C.from_dict({**FREEFORM, "loss": {"lambda_adv": 0.001}})
    torch.manual_seed(0)
    seen = []
    D = build_discriminator(cfg.model)
    D.register_forward_hook(lambda m, i, o: seen.append(i[0].detach().clone()))
    step = GanStep(build_generator(cfg.model), D, cfg, torch.device("cpu"))
    images, holes = stroke_batch()
    step(images, holes)
    real, fake = seen[0], seen[1]
    known = ~holes.bool().expand_as(images)
    assert torch.equal(real, images)
    assert torch.equal(fake[known], images[known])  # context from the photo
    assert not torch.equal(fake[~known], images[~known])  # the hole from G


def test_free_form_step_learns_on_real_crops():
    cfg = C.from_dict({**FREEFORM, "optim": {"lr_g": 1e-3}, "loss": {"lambda_adv": 0.0}})
    torch.manual_seed(0)
    step = GanStep(build_generator(cfg.model), build_discriminator(cfg.model), cfg, torch.device("cpu"))
    images, holes = stroke_batch()
    losses = [float(step(images, holes)["loss_rec"]) for _ in range(30)]
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:3])


class _HostReads(torch.overrides.TorchFunctionMode):
    """Records every way a tensor's value can reach the host: on a GPU each is a device-to-host
    copy that makes the host wait for the step (a synchronisation)."""

    READS = frozenset({"item", "cpu", "numpy", "tolist", "__bool__", "__int__", "__float__", "__index__"})

    def __init__(self):
        super().__init__()
        self.seen: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in self.READS:
            self.seen.append(func.__name__)
        return func(*args, **(kwargs or {}))


def _compact(images, holes):
    """The form the data pipelines deliver: uint8 crops and bit-packed holes."""
    from ce_ray.data.crops import pack_holes

    return ((images + 1) * 127.5).round().to(torch.uint8), torch.from_numpy(pack_holes(holes.bool().numpy()))


STEP_VARIANTS = [
    pytest.param({**TINY, "mask": {"fill": "diffusion"}}, id="centre-diffusion-gan"),
    pytest.param(
        {**TINY, "mask": {"fill": "mean"}, "data": {"batch_size": 4, "channel_shuffle": True}}, id="centre-mean"
    ),
    pytest.param({**TINY_FREEFORM, "data": {"batch_size": 4}, "loss": {"lambda_adv": 0.0}}, id="strokes-rec"),
    pytest.param(
        {**TINY_FREEFORM, "data": {"batch_size": 4}, "mask": {**TINY_FREEFORM["mask"], "fill_cycles": 2}},
        id="strokes-gan-pcg",
    ),
]


@pytest.mark.parametrize("variant", STEP_VARIANTS)
def test_input_preparation_never_leaves_the_device(variant):
    """The step's input preparation (uint8 -> [-1, 1], unpacking the holes, channel shuffle, the
    hole fill, the mask channel) runs on the `meta` device, where any read of a value back to the
    host raises: so on a GPU it makes no device-to-host copy and never synchronises."""
    cfg = C.from_dict(variant)
    meta = torch.device("meta")
    step = GanStep(build_generator(cfg.model).to(meta), build_discriminator(cfg.model).to(meta), cfg, meta)
    images, holes = stroke_batch() if cfg.mask.kind == "strokes" else batch()
    out = step.inputs(*_compact(images, holes))
    assert all(t.device == meta for t in out)
    assert out[0].shape == (4, 4 if cfg.model.mask_input else 3, 128, 128)


def test_the_meta_device_catches_a_host_round_trip():
    """The check above is live: the general diffusion_fill, given the centre hole as a device
    tensor, counts its pixels on the host and raises on `meta`."""
    from ce_ray.core.masks import diffusion_fill

    with pytest.raises(RuntimeError, match="meta"):
        diffusion_fill(torch.zeros(2, 3, 128, 128, device="meta"), torch.from_numpy(center_hole(128, 4)).to("meta"))


@pytest.mark.parametrize("variant", STEP_VARIANTS)
def test_a_whole_step_reads_nothing_back_to_the_host(variant):
    """A whole step (inputs, forward, backward, optimisers) reads no tensor value back to the
    host: its metrics stay tensors until the loop logs them. The first step is left out (it
    creates the optimiser state)."""
    cfg = C.from_dict(variant)
    step = GanStep(build_generator(cfg.model), build_discriminator(cfg.model), cfg, torch.device("cpu"))
    images, holes = stroke_batch() if cfg.mask.kind == "strokes" else batch()
    packed = _compact(images, holes)
    step(*packed)
    with _HostReads() as reads:
        m = step(*packed)
    assert reads.seen == []
    assert all(v.dim() == 0 for v in m.values())
    with _HostReads() as reads:
        float(m["loss_rec"])  # what the loop does when it logs: the detector sees it
    assert reads.seen == ["__float__"]
