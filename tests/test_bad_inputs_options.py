"""Bad-input table (see tests/bad_inputs.py): option values, options that would do nothing, --resume and
--init-from, receptive-field positions; and the check that the tables together cover every command."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

from bad_inputs import NO_CUDA, PRIOR, TRAIN, case, check_bad_input, copied_run, exported_run, image_in_png

CASES = [
    # options
    case("num-zero", "sample {px} --num 0 --out out.png", "--num"),
    case("num-negative", "sample {px} --num -1 --out out.png", "--num"),
    case("steps-zero", "train-pixels --steps 0 --out run --quiet", "--steps"),
    case("cooldown-longer-than-the-run", f"train-pixels --cooldown-steps 99 --out run {TRAIN}", "cooldown-steps"),
    case("cooldown-negative", "train-pixels --cooldown-steps -1 --out run --quiet", "--cooldown-steps"),
    case("temperature-zero", "sample {px} --temperature 0 --out out.png", "--temperature"),
    case("top-p-zero", "sample {top} --bottom {bottom} --top-p 0 --out out.png", "--top-p"),
    case("top-k-negative", "sample {px} --top-k -1 --out out.png", "--top-k"),
    case("unknown-preset", "train-pixels --preset huge --out run --quiet", "preset"),
    case("unknown-preset-receptive-field", "receptive-field --preset huge --out out.png", "unknown preset"),
    case("unknown-precision", "train-pixels --precision fp8 --out run --quiet", "--precision"),
    case("precision-auto-for-sampling", "sample {px} --precision auto --out out.png", "--precision"),
    case("dist-timeout-zero", "train-pixels --dist-timeout 0 --out run --quiet", "--dist-timeout"),
    case("dist-timeout-single-process", f"train-pixels --dist-timeout 5 --out run {TRAIN}",
         "--dist-timeout does nothing"),
    case("class-on-unconditional-model", "sample {px} --class 1 --out out.png", "not class-conditional"),
    case("marginal-on-unconditional-model", "evaluate {px} --marginal --quiet", "has no classes"),
    case("marginal-on-vqvae", "evaluate {vq} --marginal --quiet", "VQ-VAE has no classes"),
    case("guidance-negative", "sample {px} --guidance -1 --out out.png", "--guidance"),
    case("guidance-on-unconditional-model", "sample {px} --guidance 1 --out out.png", "has no classes"),
    case("guidance-without-null-class", "sample {top} --bottom {bottom} --guidance 2 --out out.png",
         "trained with a null class"),
    case("complete-guidance-without-null-class",
         "complete {px} --image in.png --keep-rows 2 --guidance 1 --out out.png", "--guidance 1", image_in_png),
    case("class-none-without-null-class", "evaluate {top} --codes {test_codes} --class none --quiet",
         "trained with a null class"),
    case("class-none-on-unconditional-model", "evaluate {px} --class none --quiet", "has no classes"),
    case("class-none-on-vqvae", "evaluate {vq} --class none --quiet", "VQ-VAE has no classes"),
    case("class-none-with-marginal", "evaluate {top} --codes {test_codes} --class none --marginal --quiet",
         "pass one"),
    case("class-out-of-range", "sample {top} --bottom {bottom} --class 10 --out out.png", r"\[0, 9\]"),
    case("class-negative", "sample {top} --bottom {bottom} --class -1 --out out.png", r"\[0, 9\]"),
    case("class-conditional-unlabeled-folder",
         f"train-pixels --dataset folder --data-dir {{images}} --class-conditional --out run {TRAIN}",
         "no class labels"),
    case("class-dropout-one", f"train-pixels --class-conditional --class-dropout 1 --out run {TRAIN}",
         "--class-dropout"),
    case("class-dropout-unconditional", f"train-pixels --class-dropout 0.1 --out run {TRAIN}", "--class-conditional"),
    case("class-dropout-unconditional-prior", f"train-prior --codes {{train_codes}} --class-dropout 0.1 --out run "
         f"{PRIOR}", "--class-conditional"),
    case("init-from-unconditional-with-class-dropout",
         f"train-pixels --init-from {{px}} --class-dropout 0.1 --out run {TRAIN}", "not class-conditional"),
    case("image-size-not-divisible-by-stride",
         "train-vqvae --preset tiny --levels 2 --image-size 10 --limit 8 --steps 1 --out run --quiet --device cpu",
         "divisible"),
    case("device-cuda-unavailable", "sample {px} --device cuda --out out.png", "CUDA", marks=NO_CUDA),
    case("device-unknown", "sample {px} --device tpu --out out.png", "unknown device"),
    case("compile-with-naive-sampler", "sample {px} --compile --method naive --out out.png", "--method cached"),
    case("complete-compile-with-naive-sampler",
         "complete {px} --image in.png --keep-rows 2 --compile --method naive --out out.png", "--method cached",
         image_in_png),
    case("device-malformed-index", "sample {px} --device cuda:x --out out.png", "unknown device"),
    case("device-cpu-index", "train-pixels --device cpu:1 --out run --quiet", "unknown device"),
    case("device-meta", "extract-codes --vqvae {vq} --device meta --out c.lmdb", "unknown device"),
    # options that would do nothing
    case("top-k-on-pixel-model", "sample {px} --top-k 5 --out out.png", "--top-k does nothing"),
    case("top-p-on-pixel-model", "sample {px} --top-p 0.9 --out out.png", "--top-p does nothing"),
    case("complete-top-k-on-pixel-model", "complete {px} --image in.png --keep-rows 2 --top-k 3 --out out.png",
         "--top-k does nothing", image_in_png),
    case("data-dir-with-sample-dataset", f"train-pixels --data-dir somewhere --out run {TRAIN}", "--dataset sample"),
    case("download-with-folder-dataset",
         f"train-pixels --dataset folder --data-dir {{images}} --download --out run {TRAIN}", "--download"),
    case("extract-data-dir-with-sample", "extract-codes --vqvae {vq} --dataset sample --data-dir x --out c.lmdb",
         "--dataset sample"),
    case("evaluate-prior-with-dataset", "evaluate {top} --codes {test_codes} --dataset sample", "for a prior"),
    case("evaluate-prior-with-split", "evaluate {top} --codes {test_codes} --split train", "--split"),
    case("mixtures-for-code-prior", f"train-prior --codes {{train_codes}} --mixtures 3 --out run {PRIOR}",
         "no such option .--mixtures"),
    case("condition-stack-for-top-prior", f"train-prior --codes {{train_codes}} --cond-layers 1 --out run {PRIOR}",
         "top prior"),
    case("top-stride-with-one-level", "train-vqvae --preset tiny --top-stride 4 --steps 1 --out run --quiet",
         "one level"),
    case("num-codes-for-pixel-preset", "receptive-field --preset tiny --num-codes 8 --out out.png", "--num-codes"),
    case("nrow-without-grid", "sample {px} --nrow 2 --save-array a.npy", "--nrow"),
    case("overwrite-without-out-dir", "sample {px} --overwrite --out out.png", "--overwrite"),
    case("sample-nothing-to-write", "sample {px}", "nothing to write"),
    case("threads-zero", "sample {px} --threads 0 --out out.png", "--threads"),
    case("presets-extra-argument", "presets tiny", "unexpected extra argument"),
    case("cache-encoding-without-cache", f"train-vqvae --cache-encoding png --out run {TRAIN}", "without --cache"),
    case("jpeg-quality-without-cache", f"train-pixels --jpeg-quality 80 --out run {TRAIN}", "without --cache"),
    case("jpeg-quality-with-png", f"train-pixels --cache k --cache-encoding png --jpeg-quality 80 --out run {TRAIN}",
         "--jpeg-quality does nothing"),
    case("jpeg-quality-with-default-raw", f"train-vqvae --cache k --jpeg-quality 80 --out run {TRAIN}",
         "only JPEG"),
    case("jpeg-quality-zero", f"train-pixels --cache k --cache-encoding jpeg --jpeg-quality 0 --out run {TRAIN}",
         "--jpeg-quality"),
    case("cache-encoding-unknown", f"train-pixels --cache k --cache-encoding webp --out run {TRAIN}",
         "--cache-encoding"),
    case("extract-cache-encoding-without-cache", "extract-codes --vqvae {vq} --cache-encoding jpeg --out c.lmdb",
         "without --cache"),
    case("evaluate-prior-with-cache-encoding", "evaluate {top} --codes {test_codes} --cache-encoding png",
         "for a prior"),
    case("evaluate-jpeg-quality-with-raw", "evaluate {vq} --cache k --jpeg-quality 50 --quiet", "only JPEG"),
    case("info-not-a-cache", "info {images}", "no vqprior cache"),
    # resume and init-from
    case("resume-changes-architecture", "train-pixels --out run --resume --filters 64 --quiet", "--filters 64",
         copied_run("px", "run")),
    case("resume-changes-class-dropout", "train-pixels --out run --resume --class-dropout 0.2 --quiet",
         r"--class-dropout 0.2 \(was 0.0\)", copied_run("px", "run")),
    case("resume-changes-dataset", "train-pixels --out run --resume --dataset mnist --quiet", "--dataset mnist",
         copied_run("px", "run")),
    case("resume-prior-other-codes", "train-prior --codes {test_codes} --out top --resume --quiet", "--codes",
         copied_run("top", "top")),
    case("resume-vqvae-changes-codebook", "train-vqvae --out vq --resume --codebook-size 8 --quiet",
         "--codebook-size 8", copied_run("vq", "vq")),
    case("resume-exported-checkpoint", "train-pixels --out exp --resume --dataset cifar10 --quiet",
         "exported checkpoint", exported_run),
    case("init-from-and-resume", f"train-pixels --init-from {{px}} --resume --out run {TRAIN}", "only one"),
    case("init-from-missing", f"train-pixels --init-from nope.pt --out run {TRAIN}", "not found"),
    case("init-from-other-kind", f"train-pixels --init-from {{vq}} --out run {TRAIN}", "vqvae checkpoint"),
    case("init-from-with-architecture", f"train-pixels --init-from {{px}} --blocks 3 --out run {TRAIN}",
         "--blocks 3"),
    case("init-from-other-image-size", "train-pixels --init-from {px} --image-size 16 --steps 1 --out run --quiet",
         "3x8x8"),
    case("init-from-prior-other-codebook", f"train-prior --codes {{other_codes}} --init-from {{top}} --out run {PRIOR}",
         "codebook size"),
    case("init-from-vqvae-1-channel-data",
         "train-vqvae --dataset mnist --data-dir {mnist} --init-from {vq} --steps 1 --out run --quiet", "1 channel"),
    # receptive field
    case("position-outside-map", "receptive-field --preset tiny --size 8 --position 8,0 --out out.png", "outside"),
    case("position-outside-checkpoint-map", "receptive-field {px} --position 0,9 --out out.png", "outside"),
    case("position-malformed", "receptive-field --preset tiny --position x --out out.png", "R,C"),
    case("receptive-field-neither-source", "receptive-field --out out.png", "exactly one"),
    case("receptive-field-compare-with-checkpoint", "receptive-field {px} --compare --out out.png", "--preset only"),
]


@pytest.mark.parametrize("bad", CASES)
def test_bad_input_is_a_one_line_error_and_writes_nothing(bad, bad_input_artefacts, tmp_path, monkeypatch):
    check_bad_input(bad, bad_input_artefacts, tmp_path, monkeypatch)


def commands_of_table(path: Path) -> set[str]:
    """The commands (first word of the command line) of every ``case(...)`` of a bad-input table, read from its
    source: test modules do not import one another."""
    commands = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "case":
            args = node.args[1]
            first = args.values[0] if isinstance(args, ast.JoinedStr) else args
            commands.add(first.value.split()[0])
    return commands


def test_the_tables_cover_every_command():
    from vqprior.commands.cli import cli

    here = Path(__file__)
    assert commands_of_table(here) == {c.values[0].args[0] for c in CASES}  # the reading sees what pytest runs
    tables = ("test_bad_inputs_files.py", "test_bad_inputs_io.py", here.name)
    covered = set().union(*(commands_of_table(here.parent / name) for name in tables))
    # compress/decompress have their table in tests/test_compress_cli.py, plot in tests/test_plot.py
    assert covered >= set(cli.commands) - {"compress", "decompress", "plot"}
