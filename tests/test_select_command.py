"""``wmss select`` (wmss/commands/select.py): inputs checked before any model is loaded, the
output directory's lock, an edited data file, kept duplicates, and the WD-DS options it shares with
``wmss train``."""

import argparse
import json
import os

import pytest
import torch

import wmss.commands
from wmss.hf import batches
from wmss.recipe import data, selection, toy
from wmss.commands import select as select_command
from wmss.io import DirectoryInUseError, directory_lock

RECORDS = [
    {"prompt": "12+30=", "completion": "42"},
    {"prompt": "What is 7*6? ", "completion": "It is 42."},
    {"prompt": "1+2=", "completion": "3"},
    {"text": "a b c d e f"},
    {"prompt": "9-4=", "completion": "5"},
]
RESULT_FILES = {selection.SCORES_FILE, selection.ACTIVE_FILE, selection.SUMMARY_FILE}


@pytest.fixture(scope="module")
def tokenizer():
    return toy.char_tokenizer()


@pytest.fixture(scope="module")
def models(tmp_path_factory, tokenizer):
    """Checkpoint directories of a tiny strong/weak pair (the strong one with the tokenizer)."""
    root = tmp_path_factory.mktemp("models")
    paths = {}
    for name, seed in (("strong", 1), ("weak", 2)):
        model = toy.tiny_causal_lm(vocab_size=len(tokenizer), seed=seed, initializer_range=0.5)
        model.save_pretrained(root / name)
        paths[name] = str(root / name)
    tokenizer.save_pretrained(paths["strong"])
    return paths


@pytest.fixture
def loaded(monkeypatch):
    """The checkpoints whose weights ``wmss select`` loads, in order."""
    paths = []
    real = select_command._load_model

    def load(path, dtype, device):
        paths.append(path)
        return real(path, dtype, device)

    monkeypatch.setattr(select_command, "_load_model", load)
    return paths


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def argv(models, data_file, out, *extra):
    return ["select", "--strong", models["strong"], "--weak", models["weak"], "--data",
            str(data_file), "--output-dir", str(out), "--no-progress", "--backend", "torch",
            *extra]


def contents(directory):
    return {name: (directory / name).read_bytes() for name in sorted(os.listdir(directory))}


def test_a_second_run_on_a_locked_directory_is_refused_and_writes_nothing(
        models, tmp_path, capsys, loaded, monkeypatch):
    data_file = write_jsonl(tmp_path / "train.jsonl", RECORDS)
    out = tmp_path / "out"
    with directory_lock(str(out), "another wmss select"):
        before = contents(out)
        assert wmss.commands.main(argv(models, data_file, out)) == 1
        error = capsys.readouterr().err
        assert error.startswith("wmss select: error:")
        assert "in use by another run (another wmss select" in error
        assert contents(out) == before and not RESULT_FILES & set(before)
        assert loaded == []  # refused before any model was loaded

    # Released: the same command runs, and holds the lock while it scores and while it saves.
    held = []

    def probe_lock(real):
        def wrapper(*args, **kwargs):
            with pytest.raises(DirectoryInUseError):
                with directory_lock(str(out), "probe"):
                    pass
            held.append(real.__name__)
            return real(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(selection, "score_dataset", probe_lock(selection.score_dataset))
    monkeypatch.setattr(selection, "save_selection", probe_lock(selection.save_selection))
    assert wmss.commands.main(argv(models, data_file, out)) == 0
    assert held == ["score_dataset", "save_selection"]
    assert RESULT_FILES <= set(os.listdir(out))


@pytest.mark.parametrize("case", ["bad json", "no data file", "bad record", "all terms 0",
                                  "too many kept draws", "bad device", "no weak model",
                                  "output is a file"])
def test_inputs_are_checked_before_any_model_is_loaded(case, models, tmp_path, capsys, loaded):
    data_file = write_jsonl(tmp_path / "train.jsonl", RECORDS)
    out = tmp_path / "out"
    extra, match = [], None
    if case == "bad json":
        data_file.write_text(json.dumps(RECORDS[0]) + "\n{oops\n")
        match = f"{data_file}:2: not valid JSON"
    elif case == "no data file":
        data_file = tmp_path / "missing.jsonl"
        match = "No such file"
    elif case == "bad record":
        write_jsonl(data_file, RECORDS + [{"question": "?"}])
        match = "expected 'prompt' and 'completion'"
    elif case == "all terms 0":
        extra, match = ["--alpha", "0", "--beta", "0", "--gamma", "0"], "all 0"
    elif case == "too many kept draws":
        extra = ["--keep-duplicates", "--num-draws", str(2 ** 31 + 1)]
        match = "num_draws=2147483649 is too many to keep every draw"
    elif case == "bad device":
        extra, match = ["--device", "gpu7"], "--device: not a torch device: 'gpu7'"
    elif case == "no weak model":
        models = {**models, "weak": str(tmp_path / "no-such-model")}
        match = "no-such-model"
    elif case == "output is a file":
        out.write_text("my notes\n")
        match = "exists and is not a directory"
    assert wmss.commands.main(argv(models, data_file, out, *extra)) == 1
    error = capsys.readouterr().err
    assert error.startswith("wmss select: error:") and match in error, error
    assert loaded == []
    if case == "output is a file":
        assert out.read_text() == "my notes\n"
    else:
        assert not out.exists()  # not even the output directory was made


def test_an_edited_data_file_is_never_matched_with_old_scores(models, tmp_path, capsys, loaded):
    data_file = write_jsonl(tmp_path / "train.jsonl", RECORDS)
    out = tmp_path / "out"
    assert wmss.commands.main(argv(models, data_file, out)) == 0
    old_scores = (out / selection.SCORES_FILE).read_text()

    edited = [dict(r) for r in RECORDS]
    edited[2] = {"prompt": "1+2=", "completion": "three"}  # as many records, other labels
    write_jsonl(data_file, edited)
    # The outputs of the old data are kept unless --overwrite ...
    assert wmss.commands.main(argv(models, data_file, out)) == 1
    assert "--overwrite" in capsys.readouterr().err
    # ... and so are its scores alone, refused before the models are loaded.
    os.remove(out / selection.ACTIVE_FILE)
    os.remove(out / selection.SUMMARY_FILE)
    loaded.clear()
    assert wmss.commands.main(argv(models, data_file, out)) == 1
    error = capsys.readouterr().err
    assert "computed on a different data set" in error and "--overwrite" in error
    assert loaded == []
    assert (out / selection.SCORES_FILE).read_text() == old_scores

    # With --overwrite, the edited data is scored afresh and the active set drawn from it.
    assert wmss.commands.main(argv(models, data_file, out, "--overwrite")) == 0
    tokenizer = toy.char_tokenizer()
    encoded = data.encode_records(edited, tokenizer)
    scores = selection.DatasetScores.load(out / selection.SCORES_FILE)
    assert scores.metadata["dataset_sha256"] == selection.dataset_fingerprint(encoded)
    assert scores.tokens.tolist() == [batches.supervised_tokens(e) for e in encoded]
    strong, weak = (toy.tiny_causal_lm(vocab_size=len(tokenizer), seed=seed,
                                       initializer_range=0.5) for seed in (1, 2))
    fresh = selection.score_dataset(strong, weak, encoded, progress=False, backend="torch")
    assert torch.allclose(scores.entropy_strong, fresh.entropy_strong, rtol=1e-6, atol=1e-7)
    assert torch.allclose(scores.entropy_weak, fresh.entropy_weak, rtol=1e-6, atol=1e-7)
    chosen = selection.select_active(scores, selection.SelectionOptions())
    assert json.loads((out / selection.ACTIVE_FILE).read_text()) == chosen.active.tolist()


def test_keep_duplicates_writes_every_draw(models, tmp_path, capsys):
    data_file = write_jsonl(tmp_path / "train.jsonl", RECORDS)
    out = tmp_path / "out"
    extra = ["--keep-duplicates", "--num-draws", "25", "--seed", "3"]
    assert wmss.commands.main(argv(models, data_file, out, *extra)) == 0
    printed = capsys.readouterr().out
    active = json.loads((out / selection.ACTIVE_FILE).read_text())
    scores = selection.DatasetScores.load(out / selection.SCORES_FILE)
    chosen = selection.select_active(scores, selection.SelectionOptions(
        num_draws=25, seed=3, keep_duplicates=True))
    assert active == chosen.active.tolist() and len(active) == 25 and active == sorted(active)
    assert len(set(active)) < 25  # 25 draws over 5 records: repeats, kept
    summary = json.loads((out / selection.SUMMARY_FILE).read_text())
    assert summary["keep_duplicates"] is True and summary["active_size"] == 25
    assert summary["duplicates"] == 25 - len(set(active)) == 25 - summary["selected"]
    assert summary["data"] == str(data_file) and summary["models"]["weak"] == models["weak"]
    assert f"{summary['duplicates']} repeated draws kept: 25 examples to train" in printed


def test_selection_arguments_parse_into_selection_options():
    parser = argparse.ArgumentParser()
    select_command.add_selection_arguments(parser.add_argument_group("selection"))
    assert select_command.selection_options(parser.parse_args([])) == \
        selection.SelectionOptions()
    args = parser.parse_args(["--alpha", "0.5", "--beta", "0", "--gamma", "1e-3", "--normalize",
                              "per_term", "--entropy-term", "weak", "--num-draws", "12",
                              "--seed", str(2 ** 63 - 1), "--keep-duplicates"])
    assert select_command.selection_options(args) == selection.SelectionOptions(
        alpha=0.5, beta=0.0, gamma=1e-3, normalize="per_term", entropy_term="weak",
        num_draws=12, seed=2 ** 63 - 1, keep_duplicates=True)


@pytest.mark.parametrize("arguments, message", [
    (["--alpha", "nan"], "argument --alpha: must be a finite number >= 0, got nan"),
    (["--beta", "-1"], "argument --beta: must be a finite number >= 0, got -1"),
    (["--gamma", "lots"], "argument --gamma: must be a finite number >= 0, got 'lots'"),
    (["--num-draws", "0"], "argument --num-draws: must be an integer in [1, 2**63), got 0"),
    (["--num-draws", str(2 ** 63)], "argument --num-draws: must be an integer in [1, 2**63)"),
    (["--seed", "-1"], "argument --seed: must be an integer in [0, 2**63), got -1"),
    (["--seed", "1.5"], "argument --seed: must be an integer in [0, 2**63), got '1.5'"),
    (["--normalize", "softmax"], "argument --normalize: invalid choice: 'softmax'"),
    (["--entropy-term", "both"], "argument --entropy-term: invalid choice: 'both'"),
])
def test_selection_arguments_reject_bad_values(arguments, message, capsys):
    parser = argparse.ArgumentParser()
    select_command.add_selection_arguments(parser)
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args(arguments)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
