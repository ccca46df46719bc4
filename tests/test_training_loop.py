"""The real-scale training options (cmkd/training/precision.py): schedules across a resume, bf16 autocast,
gradient clipping, channels_last, torch.compile, and their params validation."""

import numpy as np
import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

from cmkd.data.datasets.synthetic import ntdh_sklearn
from cmkd.errors import ConfigError
from cmkd.methods import build_distiller
from cmkd.models import build_model
from cmkd.training.config import TrainConfig
from cmkd.training.data import SplitData
from cmkd.training.distributed import seed_everything
from cmkd.training.loop import fit
from cmkd.training.precision import scheduled_lr, validate_schedule


def _vector_data(n=300):
    t, s, y = ntdh_sklearn(n_samples=n, n_features=8, n_classes=3, gamma=0.5, seed=0)
    k = int(n * 0.8)
    return (SplitData.from_arrays(teacher_input=t[:k], student_input=s[:k], target=y[:k]),
            SplitData.from_arrays(teacher_input=t[k:], student_input=s[k:], target=y[k:]))


def _image_data(n=48):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, 3, 8, 8)).astype(np.float32)
    y = (x[:, 0, :4].mean((1, 2)) > 0).astype(np.int64)
    return (SplitData.from_arrays(teacher_input=x, student_input=x, target=y),
            SplitData.from_arrays(teacher_input=x[:16], student_input=x[:16], target=y[:16]))


def _mlp_distiller(seed=0):
    seed_everything(seed)
    model = build_model({"arch": "mlp", "hidden": [16]}, (8,), 3)
    return build_distiller({"method": "supervised"}, student=model, teacher=None, num_classes=3), model


def _cnn_distiller(seed=0):
    seed_everything(seed)
    model = build_model({"arch": "small_cnn", "width": 4}, (3, 8, 8), 2)
    return build_distiller({"method": "supervised"}, student=model, teacher=None, num_classes=2), model


def _params(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


class _Stop(Exception):
    pass


def test_lr_follows_the_schedule_across_a_resume(tmp_path):
    """Cosine with one warm-up epoch, stepped per optimiser step: the learning rate at every
    epoch end is the closed form's, and a run interrupted after epoch 2 and resumed from its
    checkpoint continues the schedule (same rates, same weights) instead of restarting it."""
    train, val = _vector_data()
    schedule = {"name": "cosine", "warmup_epochs": 1, "warmup_factor": 0.1, "min_lr": 1e-4}
    cfg = TrainConfig(epochs=5, batch_size=64, lr=0.01, optimizer="sgd", seed=0, schedule=schedule)
    steps = train.steps_per_epoch(64)
    assert steps == 4  # 240 rows: 3 full batches and one of 48

    distiller, model = _mlp_distiller()
    straight = fit(distiller, train, val, cfg, task="classification", num_classes=3, progress=False)
    spec = validate_schedule(schedule, "s")
    expected = [scheduled_lr(spec, 0.01, (e + 1) * steps, 5, steps) for e in range(5)]
    lrs = [h["train/lr"] for h in straight.history]
    np.testing.assert_allclose(lrs, expected, rtol=1e-9)
    assert lrs[0] > lrs[-1] and len(set(np.round(lrs, 9))) == 5  # it really changes
    p_straight = _params(model)

    distiller, model = _mlp_distiller()

    def stop_at_2(epoch, epochs):
        if epoch == 2:
            raise _Stop

    distiller.on_epoch_start = stop_at_2
    with pytest.raises(_Stop):
        fit(distiller, train, val, cfg, task="classification", num_classes=3, progress=False, checkpoint_dir=tmp_path)
    assert "scheduler" in torch.load(tmp_path / "last.pt", weights_only=True)
    distiller, model = _mlp_distiller(seed=1)  # other initial weights: everything comes from the checkpoint
    resumed = fit(distiller, train, val, cfg, task="classification", num_classes=3, progress=False,
                  checkpoint_dir=tmp_path)
    assert resumed.resumed_from_epoch == 2
    assert [h["train/lr"] for h in resumed.history] == lrs
    assert resumed.history == straight.history
    assert torch.equal(_params(model), p_straight)


@pytest.mark.parametrize("name,extra", [("step", {"step_epochs": 2, "gamma": 0.5}), ("poly", {"power": 2.0}),
                                        ("none", {"warmup_epochs": 2})])
def test_other_schedules_follow_their_closed_form(name, extra):
    train, val = _vector_data()
    schedule = {"name": name, **extra}
    cfg = TrainConfig(epochs=4, batch_size=64, lr=0.01, seed=0, schedule=schedule)
    distiller, _ = _mlp_distiller()
    result = fit(distiller, train, val, cfg, task="classification", num_classes=3, progress=False)
    spec = validate_schedule(schedule, "s")
    expected = [scheduled_lr(spec, 0.01, (e + 1) * 4, 4, 4) for e in range(4)]
    np.testing.assert_allclose([h["train/lr"] for h in result.history], expected, rtol=1e-9)


def test_no_schedule_means_the_same_run_as_before():
    """`schedule: {name: none}` without warm-up is no scheduler at all: bit-identical weights."""
    train, val = _vector_data()
    d1, m1 = _mlp_distiller()
    r1 = fit(d1, train, val, TrainConfig(epochs=2, batch_size=64, seed=0), task="classification",
             num_classes=3, progress=False)
    d2, m2 = _mlp_distiller()
    r2 = fit(d2, train, val, TrainConfig(epochs=2, batch_size=64, seed=0, schedule={"name": "none"}),
             task="classification", num_classes=3, progress=False)
    assert torch.equal(_params(m1), _params(m2)) and r1.history == r2.history
    assert "train/lr" not in r1.history[0]


def _activation_dtypes(amp):
    train, val = _image_data()
    distiller, model = _cnn_distiller()
    seen = []
    conv = model.body[0]
    handle = conv.register_forward_hook(lambda m, i, o: seen.append((torch.is_grad_enabled(), o.dtype)))
    fit(distiller, train, val, TrainConfig(epochs=1, batch_size=16, seed=0, amp=amp), task="classification",
        num_classes=2, progress=False)
    handle.remove()
    return seen


def test_bf16_autocast_runs_the_step_in_bf16_on_cpu():
    train_dtypes = {d for grad, d in _activation_dtypes("bf16") if grad}
    assert train_dtypes == {torch.bfloat16}
    assert {d for _, d in _activation_dtypes(False)} == {torch.float32}
    assert {d for _, d in _activation_dtypes("auto")} == {torch.float32}  # auto: off on CPU


def test_fp16_uses_a_grad_scaler_that_the_checkpoint_keeps(tmp_path):
    train, val = _image_data()
    distiller, model = _cnn_distiller()
    result = fit(distiller, train, val, TrainConfig(epochs=1, batch_size=16, seed=0, amp="fp16"),
                 task="classification", num_classes=2, progress=False, checkpoint_dir=tmp_path)
    state = torch.load(tmp_path / "last.pt", weights_only=True)
    assert state["scaler"]["scale"] > 0 and np.isfinite(result.history[0]["train/loss"])


def _grad_norms(grad_clip):
    train, val = _vector_data()
    distiller, model = _mlp_distiller()
    norms = []

    def hook(optimizer, args, kwargs):
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        norms.append(float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))))

    handle = register_optimizer_step_pre_hook(hook)
    try:
        fit(distiller, train, val, TrainConfig(epochs=2, batch_size=64, lr=0.01, seed=0, grad_clip=grad_clip),
            task="classification", num_classes=3, progress=False)
    finally:
        handle.remove()
    return norms


def test_gradient_clipping_bounds_the_global_norm():
    free = _grad_norms(0.0)
    assert max(free) > 0.05  # unclipped gradients are larger than the bound below
    clipped = _grad_norms(0.05)
    assert len(clipped) == len(free) == 8
    assert max(clipped) <= 0.05 * (1 + 1e-5)


def test_channels_last_makes_weights_and_inputs_nhwc():
    train, val = _image_data()
    distiller, model = _cnn_distiller()
    inputs = []
    handle = model.body[0].register_forward_pre_hook(lambda m, args: inputs.append(args[0]))
    fit(distiller, train, val, TrainConfig(epochs=1, batch_size=16, seed=0, channels_last=True),
        task="classification", num_classes=2, progress=False)
    handle.remove()
    weights = [p for p in model.parameters() if p.dim() == 4]
    assert weights and all(w.is_contiguous(memory_format=torch.channels_last) for w in weights)
    assert all(not w.is_contiguous() for w in weights)  # NHWC, not also NCHW-contiguous (C_in > 1)
    assert inputs and all(x.is_contiguous(memory_format=torch.channels_last) for x in inputs)
    assert not inputs[0].is_contiguous()
    # and off by default, and with auto on CPU
    for option in (False, "auto"):
        distiller, model = _cnn_distiller()
        fit(distiller, train, val, TrainConfig(epochs=1, batch_size=16, seed=0, channels_last=option),
            task="classification", num_classes=2, progress=False)
        assert all(p.is_contiguous() for p in model.parameters())


def test_compile_runs_the_step_through_torch_compile():
    from torch._dynamo import register_backend, reset

    calls = []

    @register_backend(name="cmkd_test_counting")
    def counting(gm, example_inputs):
        calls.append(len(example_inputs))
        return gm.forward

    train, val = _vector_data()
    d1, m1 = _mlp_distiller()
    fit(d1, train, val, TrainConfig(epochs=1, batch_size=64, seed=0, compile="cmkd_test_counting"),
        task="classification", num_classes=3, progress=False)
    reset()
    assert calls  # dynamo captured the step's graph and handed it to the backend
    d2, m2 = _mlp_distiller()
    fit(d2, train, val, TrainConfig(epochs=1, batch_size=64, seed=0), task="classification",
        num_classes=3, progress=False)
    torch.testing.assert_close(_params(m1), _params(m2))  # the same training, compiled


@pytest.mark.parametrize("entry,key", [
    ({"schedule": {"name": "cosinus"}}, "train.x.student.schedule.name"),
    ({"schedule": {"name": "cosine", "warmup_epochs": -1}}, "train.x.student.schedule.warmup_epochs"),
    ({"schedule": {"name": "step", "power": 2}}, "train.x.student.schedule.power"),
    ({"schedule": "cosine"}, "train.x.student.schedule"),
    ({"amp": "fp8"}, "train.x.student.amp"),
    ({"amp": True}, "train.x.student.amp"),
    ({"grad_clip": -1.0}, "train.x.student.grad_clip"),
    ({"channels_last": "yes"}, "train.x.student.channels_last"),
    ({"channels_last": 1}, "train.x.student.channels_last"),
    ({"compile": 1}, "train.x.student.compile"),
    ({"nesterov": True}, "train.x.student.nesterov"),
    ({"loader": {"workers": -1}}, "train.x.student.loader.workers"),
    ({"loader": {"threads": 2}}, "train.x.student.loader.threads"),
    ({"loader": {"pin_memory": "maybe"}}, "train.x.student.loader.pin_memory"),
    ({"optimizer": "lamb"}, "train.x.student.optimizer"),
])
def test_new_training_keys_are_validated_with_one_line_errors(entry, key):
    with pytest.raises(ConfigError) as err:
        TrainConfig.from_params({"epochs": 2, **entry}, "train.x.student")
    assert err.value.key == key and str(err.value).startswith(f"params.yaml: {key}: ")
    assert "\n" not in str(err.value)


def test_valid_real_scale_entry_and_fingerprint_of_defaults():
    cfg = TrainConfig.from_params({"epochs": 50, "optimizer": "sgd", "nesterov": True, "grad_clip": "1e-1",
                                   "schedule": {"name": "cosine", "warmup_epochs": 1}, "amp": "auto",
                                   "channels_last": True, "loader": {"workers": 2}}, "k")
    assert cfg.grad_clip == 0.1 and cfg.loader_config.workers == 2
    # options at their defaults leave the fingerprint (and so checkpoints) as they were
    assert set(TrainConfig(epochs=3).fingerprint()) == {"epochs", "batch_size", "lr", "weight_decay", "optimizer",
                                                         "momentum", "seed", "augment"}
    assert TrainConfig(loader={"workers": 2}).fingerprint() == TrainConfig().fingerprint()
