"""The training loop and checkpoints: save/load round trip, exact resume, reproducibility, the learning-rate
schedule, the non-finite guard, graceful stop, and refusal of unsafe or foreign checkpoint files."""
import math

import pytest
import torch

from conftest import ImageSet, NaNTask, tiny_pixel_task, train_tiny
from vqprior.checkpoint import export_checkpoint, load_model, read_checkpoint
from vqprior.config import TrainConfig
from vqprior.errors import UserError
from vqprior.training.run_state import StepBatchSampler


def _states_equal(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_equals_uninterrupted_training(tmp_path):
    train_tiny(tmp_path / "full", 6)
    train_tiny(tmp_path / "part", 3)  # stops after 3 steps, as if killed after its checkpoint
    resumed = read_checkpoint(tmp_path / "part" / "latest.pt", "pixels")
    assert resumed["step"] == 3
    train_tiny(tmp_path / "part", 6, checkpoint=resumed)
    full = read_checkpoint(tmp_path / "full" / "latest.pt")
    part = read_checkpoint(tmp_path / "part" / "latest.pt")
    assert full["step"] == part["step"] == 6
    assert _states_equal(full["model"], part["model"])  # dropout RNG, data order, optimizer all restored
    assert _states_equal(full["ema"], part["ema"])
    assert not _states_equal(full["model"], resumed["model"])  # and training did move the weights
    import json

    def final_train_bpd(run):
        records = [json.loads(l) for l in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        return [r["bpd"] for r in records if r["split"] == "train" and r["step"] == 6]

    assert final_train_bpd("full") == final_train_bpd("part") and final_train_bpd("full")


def test_learning_rate_decays_per_step_then_cools_down_linearly():
    plain = TrainConfig(steps=100, lr=1e-3, lr_decay=0.99)
    cooled = TrainConfig(steps=100, lr=1e-3, lr_decay=0.99, cooldown_steps=20)
    assert [plain.learning_rate(s) for s in range(100)] == [1e-3 * 0.99 ** s for s in range(100)]
    assert [cooled.learning_rate(s) for s in range(81)] == [plain.learning_rate(s) for s in range(81)]
    for step in (85, 90, 99):  # (steps - step) / cooldown_steps of the decayed rate: 1/20 at the last step
        assert cooled.learning_rate(step) == pytest.approx(plain.learning_rate(step) * (100 - step) / 20, rel=1e-12)
    whole = TrainConfig(steps=10, lr=1.0, lr_decay=1.0, cooldown_steps=10)
    assert [whole.learning_rate(s) for s in range(10)] == pytest.approx([1.0 - s / 10 for s in range(10)])


@pytest.mark.parametrize("field, value, named", [("cooldown_steps", -1, "cooldown-steps"),
                                                  ("cooldown_steps", 11, "cooldown-steps"),
                                                  ("precision", "fp8", "precision"), ("lr", 0.0, "lr")])
def test_train_config_refuses_out_of_range_values(field, value, named):
    from vqprior.config import ConfigError
    with pytest.raises(ConfigError, match=named):
        TrainConfig(steps=10, **{field: value})


def test_a_cooldown_set_on_resume_trains_as_one_run_with_it(tmp_path):
    import json

    train_tiny(tmp_path / "full", 20, cooldown_steps=8, lr=1e-2, lr_decay=0.99)
    train_tiny(tmp_path / "part", 12, lr=1e-2, lr_decay=0.99)  # the stable part: the same schedule up to step 12
    train_tiny(tmp_path / "part", 20, checkpoint=read_checkpoint(tmp_path / "part" / "latest.pt"), cooldown_steps=8,
         lr=1e-2, lr_decay=0.99)
    full, part = (read_checkpoint(tmp_path / run / "latest.pt") for run in ("full", "part"))
    assert _states_equal(full["model"], part["model"]) and _states_equal(full["ema"], part["ema"])
    records = [json.loads(l) for l in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    lrs = {r["step"]: r["lr"] for r in records if r["split"] == "train"}  # a record's lr is its last step's
    assert lrs[10] == pytest.approx(1e-2 * 0.99 ** 9) and lrs[20] == pytest.approx(1e-2 * 0.99 ** 19 / 8)
    train_tiny(tmp_path / "plain", 20, lr=1e-2, lr_decay=0.99)  # and the cooldown did change the training
    assert not _states_equal(read_checkpoint(tmp_path / "plain" / "latest.pt")["model"], part["model"])


def test_same_seed_same_checkpoint_and_different_seed_differs(tmp_path):
    train_tiny(tmp_path / "a", 4)
    train_tiny(tmp_path / "b", 4)
    train_tiny(tmp_path / "c", 4, seed=8)
    a, b, c = (read_checkpoint(tmp_path / n / "latest.pt")["model"] for n in "abc")
    assert _states_equal(a, b)
    assert not _states_equal(a, c)


def test_checkpoint_round_trip_gives_identical_outputs(tmp_path):
    train_tiny(tmp_path / "run", 3)
    data = read_checkpoint(tmp_path / "run" / "latest.pt", "pixels")
    model = load_model(tmp_path / "run" / "latest.pt")
    assert not model.training
    x = ImageSet(4, seed=3).images
    reference = tiny_pixel_task().build_model().eval()
    reference.load_state_dict(data["ema"])  # load_model serves the EMA weights
    assert torch.equal(model.log_prob(x), reference.log_prob(x))
    # the exported (fp16) copy is restored to fp32 on load and stays close
    export_checkpoint(tmp_path / "run" / "latest.pt", tmp_path / "small.pt")
    small = load_model(tmp_path / "small.pt")
    assert next(small.parameters()).dtype == torch.float32
    assert torch.allclose(small.log_prob(x), model.log_prob(x), rtol=1e-2, atol=1e-1)
    assert (tmp_path / "small.pt").stat().st_size < (tmp_path / "run" / "latest.pt").stat().st_size


def test_training_lowers_the_loss(tmp_path):
    result = train_tiny(tmp_path / "run", 30, ema=0.0, lr=3e-3, eval_every=30)
    records = [l for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert result["status"] == "finished" and result["step"] == 30
    first, last = records[0], [r for r in records if '"train"' in r][-1]
    import json
    assert json.loads(last)["bpd"] < json.loads(first)["bpd"]
    assert math.isfinite(result["metrics"]["eval_bpd"])


def test_non_finite_losses_never_reach_the_weights_and_stop_the_run(tmp_path):
    task = NaNTask(tiny_pixel_task(), bad_from=3)
    with pytest.raises(UserError, match="non-finite"):
        train_tiny(tmp_path / "run", 40, task=task, max_bad_steps=5)
    kept = read_checkpoint(tmp_path / "run" / "latest.pt")
    assert kept["step"] == 3  # the last good checkpoint survives
    for name, tensor in kept["model"].items():
        assert torch.isfinite(tensor).all(), name


def test_isolated_non_finite_loss_is_skipped(tmp_path):
    class OneBad(NaNTask):
        def loss(self, model, batch):
            self.calls += 1
            loss, metrics = self.task.loss(model, batch)
            return (loss * float("inf") if self.calls == 2 else loss), metrics

    result = train_tiny(tmp_path / "run", 5, task=OneBad(tiny_pixel_task(), 0))
    assert result["status"] == "finished" and result["skipped_steps"] == 1
    assert all(torch.isfinite(t).all() for t in read_checkpoint(tmp_path / "run" / "latest.pt")["model"].values())


def test_batches_are_a_function_of_seed_and_step():
    a = StepBatchSampler(10, 4, seed=1, start_step=0, steps=6)
    b = StepBatchSampler(10, 4, seed=1, start_step=3, steps=6)
    assert list(a)[3:] == list(b)
    first_epoch = [i for batch in list(a)[:2] for i in batch] + list(a)[2][:2]
    assert sorted(first_epoch) == list(range(10))  # each epoch is a permutation
    ranks = [StepBatchSampler(10, 4, 1, 0, 6, rank=r, world_size=2) for r in (0, 1)]
    for step, (x, y) in enumerate(zip(*ranks)):
        assert sorted(x + y) == sorted(a.global_batch(step))


class Evil:
    def __reduce__(self):
        import pathlib
        return (pathlib.Path.touch, (pathlib.Path(MARKER),))


MARKER = "/nonexistent"


def test_pickled_objects_in_a_checkpoint_are_refused_without_running(tmp_path, monkeypatch):
    global MARKER
    MARKER = str(tmp_path / "pwned")
    path = tmp_path / "evil.pt"
    torch.save({"format_version": 1, "kind": "pixels", "model": {}, "payload": Evil()}, path)
    with pytest.raises(UserError, match="pickled|not a readable"):
        read_checkpoint(path)
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("content", [b"", b"not a zip file at all", None])
def test_unreadable_checkpoints_are_one_line_errors(tmp_path, content):
    path = tmp_path / "bad.pt"
    if content is None:
        torch.save({"something": 1}, path)  # a torch file, but not ours
    else:
        path.write_bytes(content)
    with pytest.raises(UserError) as err:
        read_checkpoint(path)
    assert "\n" not in str(err.value)


def test_wrong_kind_is_refused(tmp_path):
    train_tiny(tmp_path / "run", 1)
    with pytest.raises(UserError, match="pixels checkpoint; expected vqvae"):
        read_checkpoint(tmp_path / "run" / "latest.pt", "vqvae")
