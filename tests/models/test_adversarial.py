"""Behaviour of the adversarial families: separate player updates, penalties, schedules, learning."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import cpu_job
from torch import nn

from components.data.prepared import PreparedData
from components.models import create_model
from components.models.adversarial import LAZY_R1_PHASE, AdversarialModel, gradient_penalty, r1_penalty
from components.models.model_dir import load_model_dir, load_weights, save_model_dir
from components.training.trainer import STATE_FILE, LocalContext, read_outcome, run_training

FAMILIES = ("gan", "dcgan", "wgan", "wgan-gp", "stylegan")
SHAPES = [(1, 8, 8), (1, 28, 28), (1, 1, 2), (3, 5, 7)]
# Small players so that every family's checks stay fast on two shared cores.
SMALL = {
    "gan": {"latent_dim": 4, "hidden": 32},
    "dcgan": {"latent_dim": 4, "width": 8},
    "wgan": {"latent_dim": 4, "width": 8, "n_critic": 3},
    "wgan-gp": {"latent_dim": 4, "width": 8, "n_critic": 3},
    "stylegan": {"latent_dim": 4, "width": 8, "mapping_layers": 2},
}


pytestmark = pytest.mark.usefixtures("one_thread")


def snapshot(module: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.parameters()]


def unchanged(module: nn.Module, before: list[torch.Tensor]) -> bool:
    return all(torch.equal(p, q) for p, q in zip(module.parameters(), before, strict=True))


def trainer_step(
    network: nn.Module, model: AdversarialModel, optimizers, x: torch.Tensor, phase: str
) -> dict:
    """One phase exactly as `run_training` runs it: zero this phase's grads, forward, backward, step."""
    optimizers[phase].zero_grad(set_to_none=True)
    outputs = network(x, phase)
    outputs["loss"].backward()
    optimizers[phase].step()
    model.after_optimizer_step(phase)
    return outputs


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_each_phase_steps_only_its_own_player_at_any_image_size(family: str, shape: tuple[int, int, int]):
    torch.manual_seed(0)
    model = create_model(family, shape, **SMALL[family])
    assert model.data_kind == "continuous" and model.primary_metric == "fid"
    optimizers = model.configure_optimizers(1e-2)
    assert set(optimizers) == set(model.phases)
    critic, generator_phase = model.phases[:2]  # the players; a lazy penalty's phase is tested below
    x = torch.rand(6, *shape).contiguous(memory_format=torch.channels_last)

    generator_before, critic_before = snapshot(model.generator), snapshot(model.discriminator)
    outputs = trainer_step(model, model, optimizers, x, critic)
    assert all(torch.isfinite(v) and v.dim() == 0 for v in outputs.values())
    # Batch-norm running statistics of the generator may follow the fakes; its weights must not move.
    assert unchanged(model.generator, generator_before)
    assert all(p.grad is None for p in model.generator.parameters())
    assert not unchanged(model.discriminator, critic_before)

    critic_before = snapshot(model.discriminator)
    outputs = trainer_step(model, model, optimizers, x, generator_phase)
    assert torch.isfinite(outputs["loss"])
    assert not unchanged(model.generator, generator_before)
    assert unchanged(model.discriminator, critic_before)

    model.eval()
    assert all(torch.isfinite(v) for v in model.validation_metrics(x).values())
    samples = model.sample(5, generator=torch.Generator().manual_seed(1))
    assert samples.shape == (5, *shape)
    assert samples.min() >= 0 and samples.max() <= 1
    assert torch.equal(samples, model.sample(5, generator=torch.Generator().manual_seed(1)))
    assert not torch.equal(samples, model.sample(5, generator=torch.Generator().manual_seed(2)))


@pytest.fixture
def process_group(tmp_path: Path):
    """A real one-process gloo group, so the models run inside DistributedDataParallel as in training."""
    if torch.distributed.is_initialized():
        pytest.skip("a process group is already initialised in this test process")
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1
    )
    yield
    torch.distributed.destroy_process_group()


@pytest.mark.parametrize(
    ("family", "hparams"),
    [
        *((family, SMALL[family]) for family in FAMILIES),
        ("dcgan", {**SMALL["dcgan"], "r1_every": 2}),
        ("stylegan", {**SMALL["stylegan"], "ema_decay": 0.9}),
    ],
    ids=[*FAMILIES, "dcgan-lazy-r1", "stylegan-averaged"],
)
def test_phases_run_under_one_ddp_wrapper_as_the_trainer_uses_it(family: str, hparams: dict, process_group):
    torch.manual_seed(0)
    model = create_model(family, (1, 8, 8), **hparams)
    optimizers = model.configure_optimizers(1e-2)
    network = nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
    x = torch.rand(6, 1, 8, 8)
    for step in range(2 * model.critic_steps):
        for phase in model.phase_schedule(step):
            generator_before = snapshot(model.generator)
            outputs = trainer_step(network, model, optimizers, x, phase)
            assert torch.isfinite(outputs["loss"])
            if phase != "generator":
                assert unchanged(model.generator, generator_before)


def test_gradient_penalty_matches_its_closed_form_on_a_linear_critic():
    """For f(x) = w.x + b the input gradient is w everywhere, so the penalty is lambda * (||w|| - 1)^2."""
    torch.manual_seed(0)
    weight = torch.randn(12, dtype=torch.float64).requires_grad_(True)

    def critic(x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1) @ weight + 0.3

    real, fake = torch.rand(16, 3, 2, 2, dtype=torch.float64), torch.rand(16, 3, 2, 2, dtype=torch.float64)
    norm = weight.detach().norm()
    penalty = gradient_penalty(critic, real, fake, weight=10.0)
    assert penalty.item() == pytest.approx(10.0 * (norm.item() - 1) ** 2, rel=1e-9)
    # The penalty must train the critic: its gradient is 2 lambda (||w|| - 1) w / ||w||.
    penalty.backward()
    expected = 2 * 10.0 * (norm - 1) * weight.detach() / norm
    torch.testing.assert_close(weight.grad, expected)
    assert r1_penalty(critic, real, gamma=4.0).item() == pytest.approx(0.5 * 4.0 * norm.item() ** 2, rel=1e-9)


def test_wgan_runs_the_generator_every_n_critic_steps():
    model = create_model("wgan", (1, 8, 8), **{**SMALL["wgan"], "n_critic": 4})
    schedule = [tuple(model.phase_schedule(step)) for step in range(12)]
    generator_steps = [step for step, phases in enumerate(schedule) if "generator" in phases]
    assert generator_steps == [3, 7, 11]
    assert all(phases[0] == "critic" for phases in schedule)
    assert tuple(create_model("gan", (1, 8, 8)).phase_schedule(0)) == ("discriminator", "generator")
    with pytest.raises(ValueError, match="wgan-gp: critic steps per generator step must be >= 1, got 0"):
        create_model("wgan-gp", (1, 8, 8), **{**SMALL["wgan-gp"], "n_critic": 0})


def test_wgan_clips_every_critic_weight_after_the_critic_step():
    torch.manual_seed(0)
    model = create_model("wgan", (1, 8, 8), **{**SMALL["wgan"], "clip": 0.005})
    optimizers = model.configure_optimizers(0.1)
    trainer_step(model, model, optimizers, torch.rand(6, 1, 8, 8), "critic")
    largest = max(p.abs().max().item() for p in model.discriminator.parameters())
    assert largest == pytest.approx(0.005)


@pytest.mark.parametrize("family", FAMILIES)
def test_family_trains_on_digits_through_the_trainer(family: str, digits: PreparedData, tmp_path: Path):
    job = cpu_job(
        create_model(family, digits.image_shape, **SMALL[family]).spec, epochs=2, batch_size=32, lr=1e-3
    )
    run_training(job, digits.train.images[:192], digits.val.images, LocalContext(tmp_path))
    outcome = read_outcome(tmp_path)
    assert outcome.diverged is None and outcome.steps == 12
    model = load_model_dir(tmp_path)
    players = {f"{model.phases[0]}_loss", "generator_loss"}
    assert all(players <= epoch.keys() for epoch in outcome.history)
    losses = [v for epoch in outcome.history for k, v in epoch.items() if k.endswith("loss")]
    assert all(math.isfinite(v) for v in losses)
    # The optimisers' own step counters show which phases the trainer ran.
    state = torch.load(tmp_path / STATE_FILE, weights_only=True)["optimizers"]
    steps = {name: max(int(s["step"]) for s in saved["state"].values()) for name, saved in state.items()}
    penalty_steps = sum(LAZY_R1_PHASE in model.phase_schedule(step) for step in range(12))
    assert steps == {model.phases[0]: 12 + penalty_steps, "generator": 12 // model.critic_steps}
    samples = model.sample(8, generator=torch.Generator().manual_seed(0))
    assert samples.shape == (8, *digits.image_shape) and 0 <= samples.min() <= samples.max() <= 1


RING_MODES, RING_STD, RING_SCALE = 8, 0.05, 0.4  # radius-1 ring mapped into [0, 1] by 0.5 + 0.4 * point


def ring_centres() -> np.ndarray:
    angles = 2 * np.pi * np.arange(RING_MODES) / RING_MODES
    return np.stack([np.cos(angles), np.sin(angles)], axis=1)


def ring_points(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    points = ring_centres()[rng.integers(0, RING_MODES, n)] + rng.normal(0, RING_STD, (n, 2))
    return (0.5 + RING_SCALE * points).astype(np.float32).reshape(n, 1, 1, 2)


def test_gan_recovers_the_modes_of_a_ring_of_gaussians(tmp_path: Path):
    """The classic mode-collapse check: 8 Gaussians (std 0.05) on a unit ring, as 1 x 1 x 2 images.

    A mode counts as recovered when at least 2% of 2,000 samples lie within 3 std of its centre;
    samples within 3 std of any centre are "high quality". With these settings seeds 0-9 all
    recovered 8 of 8 modes, with 53-86% high-quality samples (77% at seed 0); 1,000 steps are not
    always enough, 1,500 were.
    """
    spec = create_model("gan", (1, 1, 2), latent_dim=8, hidden=128).spec
    job = cpu_job(spec, epochs=150, batch_size=256, lr=2e-3)
    run_training(job, ring_points(2560, seed=0), ring_points(256, seed=1), LocalContext(tmp_path))
    samples = load_model_dir(tmp_path).sample(2000, generator=torch.Generator().manual_seed(0))
    points = (samples.reshape(-1, 2).numpy() - 0.5) / RING_SCALE
    distances = np.linalg.norm(points[:, None, :] - ring_centres()[None], axis=2)
    near = distances.min(axis=1) < 3 * RING_STD
    per_mode = np.bincount(distances.argmin(axis=1)[near], minlength=RING_MODES)
    recovered = int((per_mode >= 0.02 * len(points)).sum())
    print(f"ring: {recovered}/8 modes recovered, {near.mean():.0%} high-quality samples, per mode {per_mode}")
    assert recovered >= 7, f"only {recovered} of 8 modes recovered; samples per mode: {per_mode}"
    assert near.mean() >= 0.5, f"only {near.mean():.0%} of samples lie within 3 std of a mode"


def test_stylegan_demodulation_restores_unit_output_variance():
    """Whatever the style, a demodulated convolution of unit-variance noise has unit-variance output
    channels; without demodulation a style three times larger gives nine times the variance."""
    from components.models.families.stylegan import ModulatedConv2d

    torch.manual_seed(0)
    for demodulate in (True, False):
        conv = ModulatedConv2d(16, 8, 3, style_dim=4, demodulate=demodulate)
        x, w = torch.randn(1, 16, 64, 64), 3 * torch.randn(1, 4)
        with torch.no_grad():
            variance = conv(x, w)[0, :, 1:-1, 1:-1].var(dim=(1, 2))  # the interior, away from the padding
        if demodulate:
            torch.testing.assert_close(variance, torch.ones(8), rtol=0.12, atol=0)
        else:
            assert variance.mean() > 3


def test_stylegan_style_mixing_changes_the_image_from_the_crossover_on():
    torch.manual_seed(0)
    model = create_model("stylegan", (3, 32, 32), latent_dim=4, width=8, mapping_layers=2).eval()
    synthesis = model.generator.synthesis
    assert synthesis.num_ws == 8 and len(synthesis.to_images) == 4  # 4x4, 8x8, 16x16, 32x32 blocks
    z, other = torch.randn(2, 4), torch.randn(2, 4)

    def draw(crossover: int) -> torch.Tensor:
        ws = model.mixed_ws(model.generator, z, other, torch.full((2,), crossover))
        with torch.no_grad():
            return synthesis(ws, torch.Generator().manual_seed(0))

    unmixed = draw(synthesis.num_ws)
    with torch.no_grad():
        assert torch.allclose(unmixed, model.generator(z, torch.Generator().manual_seed(0)))
    coarse_from_other, fine_from_other = draw(2), draw(6)
    assert not torch.allclose(unmixed, fine_from_other) and not torch.allclose(unmixed, coarse_from_other)
    # Taking only the finest layers from the other code changes the image less than taking all but the first.
    assert (unmixed - fine_from_other).abs().mean() < (unmixed - coarse_from_other).abs().mean()


@pytest.mark.parametrize(
    ("family", "size"),
    [("stylegan", {"latent_dim": 4, "width": 8, "mapping_layers": 2}), ("dcgan", {"width": 8})],
)
def test_discriminator_loss_carries_the_r1_penalty_on_real_images(family, size):
    torch.manual_seed(0)
    x = torch.rand(6, 3, 16, 16)
    model = create_model(family, (3, 16, 16), **size, r1_gamma=5.0, r1_every=1)
    outputs = model(x, "discriminator")
    expected = r1_penalty(model.discriminator, 2 * x - 1, gamma=5.0)
    assert outputs["penalty"].item() == pytest.approx(expected.item(), rel=1e-5) and expected.item() > 0
    without = create_model(family, (3, 16, 16), **size, r1_gamma=0.0)
    assert "penalty" not in without(x, "discriminator")
    with pytest.raises(ValueError, match=f"{family}: expected .*r1_gamma >= 0, got .*r1_gamma=-1"):
        create_model(family, (3, 16, 16), r1_gamma=-1.0)


def test_stylegan_refuses_a_mixing_probability_outside_0_1():
    with pytest.raises(ValueError, match="mixing_prob in \\[0, 1\\]"):
        create_model("stylegan", (3, 16, 16), mixing_prob=1.5)


def test_held_out_images_are_scored_as_training_scores_its_batches():
    torch.manual_seed(0)
    model = create_model("dcgan", (3, 16, 16), latent_dim=4, width=8)
    x = torch.rand(32, 3, 16, 16)
    for _ in range(3):  # training-mode passes move the running statistics away from batch ones
        model(x, "discriminator")
    in_training = copy.deepcopy(model)(x, "discriminator")["d_real"]
    model.eval()
    before = copy.deepcopy(model.discriminator.state_dict())
    with torch.no_grad():
        held_out = model.validation_metrics(x)["val_d_real"]
    assert held_out.item() == pytest.approx(in_training.item(), rel=1e-5)
    after = model.discriminator.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not any(m.training for m in model.discriminator.modules())


def test_a_lazy_r1_penalty_is_a_discriminator_step_of_k_times_its_weight_every_kth_step(
    digits: PreparedData, tmp_path: Path
):
    torch.manual_seed(0)
    lazy = {"latent_dim": 4, "width": 8, "r1_gamma": 2.0, "r1_every": 4}
    model = create_model("dcgan", (3, 16, 16), **lazy)
    assert [step for step in range(12) if "r1" in model.phase_schedule(step)] == [0, 4, 8]
    optimizers = model.configure_optimizers(1e-3)
    assert optimizers["r1"] is optimizers["discriminator"]  # one Adam state for the discriminator
    x = torch.rand(6, 3, 16, 16)
    assert "penalty" not in model(x, "discriminator")
    expected = r1_penalty(model.discriminator, 2 * x - 1, gamma=2.0).item()
    generator_before, discriminator_before = snapshot(model.generator), snapshot(model.discriminator)
    outputs = trainer_step(model, model, optimizers, x, "r1")
    assert outputs["loss"].item() == pytest.approx(4 * expected, rel=1e-5) and expected > 0
    assert outputs["penalty"].item() == pytest.approx(expected, rel=1e-5)
    assert unchanged(model.generator, generator_before) and not unchanged(
        model.discriminator, discriminator_before
    )
    with pytest.raises(ValueError, match="dcgan: expected r1_every >= 1, got r1_every=0"):
        create_model("dcgan", (3, 16, 16), r1_every=0)

    # Through the trainer: 12 steps step the discriminator's optimiser 12 times plus 3 for the penalty.
    spec = create_model("dcgan", digits.image_shape, **lazy).spec
    run_training(
        cpu_job(spec, epochs=2, batch_size=32, lr=1e-3),
        digits.train.images[:192],
        digits.val.images,
        LocalContext(tmp_path),
    )
    history = read_outcome(tmp_path).history
    assert all(math.isfinite(epoch["r1_loss"]) and epoch["penalty"] > 0 for epoch in history)
    state = torch.load(tmp_path / STATE_FILE, weights_only=True)["optimizers"]
    assert state.keys() == {"discriminator", "generator"}  # the shared optimiser saved once
    assert max(int(s["step"]) for s in state["discriminator"]["state"].values()) == 15


@pytest.mark.parametrize("family", ["dcgan", "stylegan"])
def test_the_generators_average_follows_each_generator_step_and_is_what_sample_draws(family: str):
    torch.manual_seed(0)
    model = create_model(family, (3, 8, 8), **SMALL[family], ema_decay=0.9)
    average = model.generator_average.module
    assert unchanged(average, snapshot(model.generator))  # it starts as the generator
    optimizers = model.configure_optimizers(1e-2)
    x = torch.rand(6, 3, 8, 8)
    expected = None
    for updates in range(4):
        trainer_step(model, model, optimizers, x, model.phases[0])
        trainer_step(model, model, optimizers, x, "generator")
        current = snapshot(model.generator)
        if expected is None:  # the first update copies
            expected = current
        else:  # then moves towards the generator by 1 - decay, the decay ramping up to ema_decay
            decay = min(0.9, (1 + updates) / (10 + updates))
            expected = [decay * e + (1 - decay) * c for e, c in zip(expected, current, strict=True)]
        assert all(
            torch.allclose(a, e, atol=1e-6) for a, e in zip(average.parameters(), expected, strict=True)
        )
    assert int(model.generator_average.n_averaged) == 4
    assert all(not p.requires_grad for p in average.parameters())

    model.eval()
    seeded = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    with torch.no_grad():
        from_average = (model.generate(5, seeded(), average) + 1) / 2
        from_generator = (model.generate(5, seeded()) + 1) / 2
    assert torch.equal(model.sample(5, seeded()), from_average.clamp(0, 1))
    assert not torch.allclose(from_average, from_generator, atol=1e-3)


def test_the_average_leaves_the_training_as_it_would_be_without_it():
    trained = []
    for ema_decay in (0.0, 0.9):
        torch.manual_seed(0)
        model = create_model("dcgan", (3, 8, 8), **SMALL["dcgan"], ema_decay=ema_decay)
        optimizers = model.configure_optimizers(1e-2)
        for step in range(3):
            for phase in model.phase_schedule(step):
                trainer_step(model, model, optimizers, torch.rand(6, 3, 8, 8), phase)
        trained.append(
            {k: v for k, v in model.state_dict().items() if not k.startswith("generator_average.")}
        )
    plain, averaged = trained
    assert plain.keys() == averaged.keys()
    assert all(torch.equal(plain[k], averaged[k]) for k in plain)


def test_weights_without_an_average_load_with_the_average_at_their_generator(tmp_path: Path):
    torch.manual_seed(0)
    plain = create_model("dcgan", (3, 8, 8), **SMALL["dcgan"])
    optimizers = plain.configure_optimizers(1e-2)
    x = torch.rand(6, 3, 8, 8)
    for phase in plain.phases[:2]:  # weights (and batch-norm statistics) away from their start
        trainer_step(plain, plain, optimizers, x, phase)
    save_model_dir(plain.eval(), tmp_path)

    averaged = create_model("dcgan", (3, 8, 8), **SMALL["dcgan"], ema_decay=0.99)
    load_weights(averaged, tmp_path)
    averaged.eval()
    seeded = lambda: torch.Generator().manual_seed(1)  # noqa: E731
    assert torch.equal(averaged.sample(4, seeded()), plain.sample(4, seeded()))
    assert int(averaged.generator_average.n_averaged) == 1  # the next update averages, not copies

    # A model saved with its average keeps it: the average is part of its weights.
    trainer_step(averaged, averaged, averaged.configure_optimizers(1e-2), x, "generator")
    save_model_dir(averaged.eval(), tmp_path / "averaged")
    reloaded = load_model_dir(tmp_path / "averaged")
    assert torch.equal(reloaded.sample(4, seeded()), averaged.sample(4, seeded()))
    assert not torch.equal(reloaded.sample(4, seeded()), plain.sample(4, seeded()))
    with pytest.raises(ValueError, match=r"dcgan: expected ema_decay in \[0, 1\), got ema_decay=1"):
        create_model("dcgan", (3, 8, 8), ema_decay=1)
