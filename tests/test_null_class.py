"""Training with a null class (classifier-free guidance, docs/guidance.md): ``--class-dropout P`` replaces labels
by a learned null class with probability P; the null class is in the checkpoint and in ``info``; a resumed run keeps
P; ``--init-from`` a model without a null class gives it one whose embedding starts at the mean of the classes."""
import math
import re

import pytest
import torch

from cli_support import TRAIN_FAST, check_ok, run_cli, train_pixel_run
from vqprior.checkpoint import read_checkpoint
from vqprior.config import ConfigError, DataConfig, ModelConfig, model_config_from_preset
from vqprior.models.null_class import add_null_class, drop_labels, null_label
from vqprior.models.pixelsnail import PixelSNAIL
from vqprior.training.pixel_task import PixelTask

FAST = ["--steps", "1", "--lr", "1e-12", "--eval-limit", "4", "--num-samples", "1", "--batch-size", "4", "--quiet",
        "--device", "cpu"]  # one step at a learning rate that leaves the weights where they started
PIXELS = ["--dataset", "sample", "--image-size", "8", "--limit", "8"]


def tiny(null_class=True, **kw) -> ModelConfig:
    return model_config_from_preset("tiny", head="pixels", height=4, width=4, num_classes=3, null_class=null_class,
                                    **kw)


def error_line(result) -> str:
    assert result.exit_code not in (0, None), result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error")]
    assert len(errors) == 1 and "Traceback" not in result.output, result.output
    return errors[0]


# --- the library ---------------------------------------------------------------------------------------------------

def test_a_null_class_is_one_more_embedding_row_and_needs_classes():
    model = PixelSNAIL(tiny())
    rows = {m.class_embedding.weight.shape[0] for m in model.modules() if getattr(m, "class_embedding", None)}
    assert rows == {4} and null_label(model.config) == 3
    assert {m.class_embedding.weight.shape[0] for m in PixelSNAIL(tiny(False)).modules()
            if getattr(m, "class_embedding", None)} == {3}
    with pytest.raises(ConfigError, match="null class needs a class-conditional"):
        model_config_from_preset("tiny", head="pixels", null_class=True)
    with pytest.raises(ConfigError, match="class-dropout needs a class-conditional"):
        DataConfig(class_dropout=0.1)
    with pytest.raises(ConfigError, match=r"\[0, 1\)"):
        DataConfig(class_conditional=True, class_dropout=1.0)
    with pytest.raises(Exception, match="trained with a null class"):
        null_label(tiny(False), "--guidance")


def test_the_null_label_is_a_valid_input_only_with_a_null_class():
    x = torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8)
    PixelSNAIL(tiny()).check_inputs(x, torch.tensor([0, 3]))
    with pytest.raises(ValueError, match=r"label outside \[0, 2\]"):
        PixelSNAIL(tiny(False)).check_inputs(x, torch.tensor([0, 3]))


def test_drop_labels_replaces_a_share_p_by_the_null_label():
    config = tiny()
    label = torch.arange(20000) % 3
    torch.manual_seed(0)
    dropped = drop_labels(label, config, 0.25)
    null = dropped == 3
    # Binomial(20000, 0.25): sd 61, so 4.5 sd either side.
    assert abs(int(null.sum()) - 5000) < 275
    assert torch.equal(dropped[~null], label[~null])
    assert drop_labels(label, config, 0.0) is label
    with pytest.raises(ValueError):
        drop_labels(label, tiny(False), 0.1)


def test_the_training_loss_reaches_the_null_row_only_through_dropped_labels():
    torch.manual_seed(0)
    config = tiny()
    batch = {"image": torch.randint(0, 256, (4, 3, 4, 4), dtype=torch.uint8), "label": torch.tensor([0, 1, 2, 0])}
    grads = {}
    for p in (0.0, 0.999999):
        model = PixelSNAIL(config)
        for m in model.modules():
            if getattr(m, "class_embedding", None) is not None:
                torch.nn.init.normal_(m.class_embedding.weight)
        task = PixelTask(config, DataConfig(class_conditional=True, class_dropout=p))
        task.loss(model, batch)[0].backward()
        emb = next(m.class_embedding for m in model.modules() if getattr(m, "class_embedding", None) is not None)
        grads[p] = emb.weight.grad
    assert grads[0.0][3].abs().sum() == 0 and grads[0.0][:3].abs().sum() > 0
    assert grads[0.999999][3].abs().sum() > 0 and grads[0.999999][:3].abs().sum() == 0


def test_add_null_class_appends_the_mean_of_the_class_rows_and_keeps_the_rest():
    source = PixelSNAIL(tiny(False))
    for m in source.modules():
        if getattr(m, "class_embedding", None) is not None:
            torch.nn.init.normal_(m.class_embedding.weight)
    weights = add_null_class(source.state_dict(), source.config)
    target = PixelSNAIL(tiny())
    target.load_state_dict(weights, strict=True)
    for name, w in source.state_dict().items():
        if name.endswith("class_embedding.weight"):
            assert torch.equal(weights[name][:3], w) and torch.allclose(weights[name][3], w.mean(0))
        else:
            assert torch.equal(weights[name], w)
    with pytest.raises(ValueError):
        add_null_class(weights, tiny())


# --- the train commands ----------------------------------------------------------------------------------------

def test_class_dropout_is_kept_in_the_checkpoint_and_shown_by_info(tmp_path):
    train_pixel_run(tmp_path / "run", "--class-conditional", "--class-dropout", "0.5", steps=1, limit=8)
    data = read_checkpoint(tmp_path / "run" / "latest.pt")
    assert data["config"]["model"]["null_class"] is True and data["config"]["data"]["class_dropout"] == 0.5
    assert data["model"]["blocks.0.res.0.class_embedding.weight"].shape[0] == 11
    text = check_ok(run_cli("info", tmp_path / "run" / "latest.pt")).output
    assert "class-conditional over 10 classes, with a null class" in text and "class_dropout=0.5" in text
    # A resumed run keeps P: the same value is accepted, another is refused naming it.
    check_ok(run_cli("train-pixels", *PIXELS, "--class-dropout", "0.5", "--resume", "--steps", "2", "--quiet",
                     "--device", "cpu", "--out", tmp_path / "run"))
    line = error_line(run_cli("train-pixels", "--resume", "--class-dropout", "0.2", "--steps", "3", "--quiet",
                              "--out", tmp_path / "run"))
    assert "--class-dropout 0.2 (was 0.5)" in line and "resumed run keeps" in line


def test_class_dropout_needs_a_class_conditional_model(tmp_path, pixel_run):
    line = error_line(run_cli("train-pixels", *TRAIN_FAST, "--class-dropout", "0.1", "--out", tmp_path / "a"))
    assert "--class-dropout 0.1" in line and "--class-conditional" in line
    line = error_line(run_cli("train-pixels", *PIXELS, "--init-from", pixel_run.checkpoint,
                              "--class-dropout", "0.1", *FAST, "--out", tmp_path / "b"))
    assert "is not class-conditional" in line
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_init_from_a_model_without_a_null_class_adds_one_at_the_mean(conditional_run, tmp_path):
    source = read_checkpoint(conditional_run.checkpoint)
    result = check_ok(run_cli("train-pixels", *PIXELS, "--init-from", conditional_run.checkpoint,
                              "--class-dropout", "0.2", *FAST, "--out", tmp_path / "ft"))
    assert "adding a null class to the 10 classes" in result.stderr
    data = read_checkpoint(tmp_path / "ft" / "latest.pt")
    assert data["config"]["model"] == {**source["config"]["model"], "null_class": True}
    assert data["config"]["data"]["class_dropout"] == 0.2
    for name, w in source["ema"].items():
        got = data["model"][name].float()
        if name.endswith("class_embedding.weight"):
            assert torch.allclose(got[:10], w.float(), atol=1e-6) and torch.allclose(got[10], w.float().mean(0),
                                                                                        atol=1e-6)
        else:
            assert torch.allclose(got, w.float(), atol=1e-6), name
    # Fine-tuning it again keeps its null class, with or without --class-dropout.
    check_ok(run_cli("train-pixels", *PIXELS, "--init-from", tmp_path / "ft" / "latest.pt", *FAST,
                     "--out", tmp_path / "ft2"))
    again = read_checkpoint(tmp_path / "ft2" / "latest.pt")
    assert again["config"]["model"]["null_class"] is True and again["config"]["data"]["class_dropout"] == 0.0


def test_train_prior_with_class_dropout_and_init_from(prior_pipeline, tmp_path):
    p = prior_pipeline
    codes = ["--codes", p.train_codes]
    check_ok(run_cli("train-prior", *codes, "--class-conditional", "--class-dropout", "0.3", *FAST,
                     "--out", tmp_path / "new"))
    data = read_checkpoint(tmp_path / "new" / "latest.pt")
    assert data["config"]["model"]["null_class"] is True and data["config"]["data"]["class_dropout"] == 0.3
    check_ok(run_cli("train-prior", *codes, "--init-from", p.top, "--class-dropout", "0.1", *FAST,
                     "--out", tmp_path / "ft"))
    assert read_checkpoint(tmp_path / "ft" / "latest.pt")["config"]["model"]["null_class"] is True
    line = error_line(run_cli("train-prior", *codes, "--resume", "--class-dropout", "0.2", "--quiet",
                              "--out", tmp_path / "new"))
    assert re.search(r"--class-dropout 0.2 \(was 0.3\)", line), line
    line = error_line(run_cli("train-prior", *codes, "--init-from", p.bottom, "--class-dropout", "0.1", *FAST,
                              "--out", tmp_path / "bad"))
    assert "not class-conditional" in line


# --- the null class as a density (evaluate --class none) ----------------------------------------------------------

def test_the_null_class_is_a_normalised_density_over_every_code_map():
    import itertools

    from vqprior.evaluation.likelihood import NullClass

    torch.manual_seed(0)
    config = model_config_from_preset("tiny", head="codes", num_codes=3, height=2, width=3, num_classes=3,
                                      null_class=True, cond_num_codes=2, cond_height=1, cond_width=1)
    model = PixelSNAIL(config).double().eval()
    for m in model.modules():
        if getattr(m, "class_embedding", None) is not None:
            torch.nn.init.normal_(m.class_embedding.weight)
    maps = torch.tensor(list(itertools.product(range(3), repeat=6))).view(-1, 2, 3)  # all 3^6 code maps
    condition = torch.ones(len(maps), 1, 1, dtype=torch.long)
    log_p = NullClass(model).log_prob(maps, condition=condition, label=torch.zeros(len(maps), dtype=torch.long))
    assert float(torch.logsumexp(log_p.sum((1, 2)), 0).exp()) == pytest.approx(1.0, abs=1e-10)
    with torch.no_grad():
        given_null = model.log_prob(maps, condition=condition, label=torch.full((len(maps),), 3))
        given_0 = model.log_prob(maps, condition=condition, label=torch.zeros(len(maps), dtype=torch.long))
    assert torch.equal(log_p, given_null) and not torch.allclose(log_p, given_0)
    with pytest.raises(Exception, match="trained with a null class"):
        NullClass(PixelSNAIL(tiny(False)))


def test_evaluate_class_none_scores_the_null_class(tmp_path):
    train_pixel_run(tmp_path / "run", "--class-conditional", "--class-dropout", "0.5", steps=1, limit=8)
    ckpt = tmp_path / "run" / "latest.pt"
    pattern = r"([\d.]+) bits/dim on sample test(.*): 16 items"
    figures = {}
    for args in ([], ["--class", "label"], ["--class", "none"], ["--marginal"]):
        out = check_ok(run_cli("evaluate", ckpt, "--limit", "16", "--quiet", "--device", "cpu", *args)).output
        match = re.search(pattern, out)
        assert match, out
        figures[" ".join(args)] = (float(match.group(1)), match.group(2))
    assert figures[""] == figures["--class label"] and figures[""][1] == ""
    assert "the null class" in figures["--class none"][1] and "marginal" in figures["--marginal"][1]
    assert figures["--class none"][0] != figures[""][0] and figures["--class none"][0] != figures["--marginal"][0]
    # The null class's figure is the model's log-likelihood given label 10, computed here without the CLI.
    from vqprior.checkpoint import load_model
    from vqprior.data.loader import load_image_dataset

    model = load_model(ckpt)
    images = torch.stack([torch.as_tensor(load_image_dataset("sample", "test", image_size=8)[i]["image"])
                          for i in range(16)])
    with torch.no_grad():
        nats = -model.log_prob(images, label=torch.full((16,), 10)).double().sum()
    assert figures["--class none"][0] == pytest.approx(float(nats) / (16 * 3 * 64 * math.log(2)), abs=1e-4)
