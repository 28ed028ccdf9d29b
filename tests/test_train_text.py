"""Smoke tests of the text task of large_batch_study/train_large_batch.py (seconds; a synthetic corpus in the
fortune format in a tmp folder, not the installed ``fortunes`` package): parsing and cleaning, the
split by fortune, the BPTT windows, lr selection on validation loss, and the CLI end to end."""

import json
import math
import os
import random

import pytest
import torch

from kit import importable, load_script

STUDY = importable("large_batch_study")

from train.report import select_lr  # noqa: E402
from train.tasks import ImageTask, TextTask  # noqa: E402
from train.text import (EOF_ID, UNK_ID, TextSplit, batchify, bptt_windows, clean,  # noqa: E402
                        fortune_files, load_fortunes, parse_fortunes)


def _cli():
    return load_script(os.path.join(STUDY, "train_large_batch.py"), "train_large_batch")


WORDS = "the a cat dog sat on mat and ran far away from home".split()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Two fortune files of 60 short quotes each, with a .dat index and a .u8 symlink beside each,
    like /usr/share/games/fortunes; 'Z' appears only in the second file's quotes."""
    d = tmp_path_factory.mktemp("fortunes")
    rng = random.Random(0)
    for name, extra in (("alpha", ""), ("beta", " Z")):
        quotes = [" ".join(rng.choice(WORDS) for _ in range(12)) + extra + "\n\t-- someone" for _ in range(60)]
        (d / name).write_text("\n%\n".join(quotes) + "\n%\n")
        (d / f"{name}.dat").write_bytes(b"\x00\x00\x00\x02%\xff junk index")
        os.symlink(name, d / f"{name}.u8")
    return str(d)


def test_clean_resolves_overstriking_and_drops_control_chars():
    assert clean("____\b\b\b\bLAST time") == "LAST time"
    assert clean("*___\b\b\band* _\bN-1") == "*and* N-1"
    assert clean("Ren'\be Descartes") == "Rene Descartes"
    assert clean("\bstart\x07 ok\tx\ny") == "start ok\tx\ny"  # nothing to erase; BEL dropped


def test_parse_fortunes_splits_on_percent_lines_only():
    text = "%\nfirst\nline two\n%\n\n%\n100% sure\n_\bunder\n%\nlast"
    assert parse_fortunes(text) == ["first\nline two\n", "100% sure\nunder\n", "last\n"]


def test_load_splits_by_fortune_and_maps_unknown_chars(corpus):
    assert [os.path.basename(f) for f in fortune_files(corpus)] == ["alpha", "beta"]
    quotes = []
    for f in fortune_files(corpus):
        quotes += parse_fortunes(open(f).read())
    assert len(quotes) == 120
    data = load_fortunes(corpus)
    info = data.info
    assert (info["fortunes"], info["val_fortunes"], info["test_fortunes"], info["train_fortunes"]) == (120, 6, 6, 108)

    def decode(split):
        out, bounds = [], split.starts.tolist()
        for a, b in zip(bounds[:-1], bounds[1:]):
            ids = split.ids[a:b].tolist()
            assert ids[-1] == EOF_ID and EOF_ID not in ids[:-1]  # one <eof> ends each fortune
            out.append("".join(data.vocab[i] for i in ids[:-1]))
        return out

    train, val, test = decode(data.train), decode(data.val), decode(data.test)
    assert sorted(train + val + test) == sorted(quotes)  # whole fortunes, each in one split
    assert data.train.ids.dtype == torch.int64 and len(data.train) == sum(len(q) + 1 for q in train)
    assert data.vocab[:2] == ["<unk>", "<eof>"] and set(data.vocab[2:]) == set("".join(train))
    # the same split again (fixed seed), another with another seed
    assert decode(load_fortunes(corpus).val) == val
    assert decode(load_fortunes(corpus, split_seed=1).val) != val
    # a character missing from the training text is <unk> in validation
    small = load_fortunes(corpus, train_chars=1)
    assert small.info["train_fortunes"] == 1 and small.info["n_val"] == info["n_val"]
    stoi = {c: i for i, c in enumerate(small.vocab)}
    expect = []
    for q in val:
        expect += [stoi.get(c, UNK_ID) for c in q] + [EOF_ID]
    assert small.val.ids.tolist() == expect
    assert small.info["unk_val"] == expect.count(UNK_ID) > 0


def test_missing_corpus_says_how_to_install(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install -y fortunes"):
        load_fortunes(str(tmp_path / "nowhere"))


def test_windows_see_every_training_char_once_per_epoch():
    n, streams, bptt = 1000, 7, 16
    starts = torch.tensor([0, 100, 350, 351, 600, 1000])
    split = TextSplit(torch.arange(n), starts)  # ids = positions, so each char is told apart
    order = split.shuffled(torch.Generator().manual_seed(0))
    assert sorted(order.tolist()) == list(range(n)) and not torch.equal(order, split.ids)
    pos, bounds = 0, starts.tolist()
    while pos < n:  # fortunes kept whole: each block of the new order is one fortune
        a = order[pos].item()
        b = bounds[bounds.index(a) + 1]
        assert order[pos : pos + b - a].tolist() == list(range(a, b))
        pos += b - a
    data = batchify(order, streams)
    length = n // streams
    assert data.shape == (length, streams) and torch.equal(data[:, 1], order[length : 2 * length])
    targets, lengths = [], []
    for x, y in bptt_windows(data, bptt):
        assert x.shape == y.shape and x.shape[1] == streams and x.shape[0] <= bptt
        assert torch.equal(x[1:], y[:-1])  # the next character
        targets.append(y)
        lengths.append(x.shape[0])
    assert lengths == [bptt] * ((length - 1) // bptt) + ([(length - 1) % bptt] if (length - 1) % bptt else [])
    seen = torch.cat(targets).flatten().tolist() + data[0].tolist()  # targets and the streams' first chars
    assert len(seen) == len(set(seen)) == n - n % streams  # each once; only the last n % streams dropped
    assert set(seen) == set(order[: n - n % streams].tolist())


def test_lr_selection_direction_per_task():
    def run(lr, val_loss, val_acc, diverged=False):
        return {"model": "m", "optimizer": "sngm", "batch_size": 8, "lr": lr, "seed": 0, "phase": "grid",
                "diverged": diverged, "final": {"val_loss": val_loss, "val_acc": val_acc}}

    runs = [run(0.1, 2.0, 0.9), run(0.3, 1.5, 0.5), run(1.0, float("nan"), 0.95, diverged=True),
            run(3.0, 1.5, 0.2)]
    text = select_lr(TextTask(), runs, "m", "sngm", 8, 0)
    assert text["chosen_lr"] == 0.3 and text["val_loss"]["0.3"] == 1.5 and text["diverged"] == [1.0]
    assert not text["at_grid_edge"]
    assert select_lr(ImageTask(), runs, "m", "sngm", 8, 0)["chosen_lr"] == 0.1  # higher accuracy wins


def test_cli_quick_fortunes_writes_json_table_and_plot(corpus, tmp_path, capsys):
    out = str(tmp_path / "text_quick")
    rc = _cli().main(["--task", "fortunes", "--quick", "--data-dir", corpus, "--epochs", "2", "--bptt", "8",
                      "--batch-sizes", "4,16", "--optimizers", "msgd,sngm,adam", "--device", "cpu",
                      "--out", out])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "Table 6" in printed and "SNGM" in printed
    res = json.load(open(out + ".json"))
    s = res["settings"]
    assert s["task"] == "fortunes" and s["task_args"] == {"bptt": 8} and s["epochs"] == 2
    assert s["momentum"] == 0.9 and s["weight_decay"] == 1e-4
    cli = _cli()
    assert s["lrs"]["lstm/sngm/16"] == {"lrs": [cli.FIXED_LRS[("lstm", "sngm", 16)]], "source": "full run's choice"}
    middle = cli.grid_for("fortunes", "sngm", 4, {})[1]
    assert s["lrs"]["lstm/sngm/4"] == {"lrs": [middle], "source": "middle of the grid (no full-run choice)"}
    assert len(res["runs"]) == 6 and len(res["table"]) == 6
    n_train = res["data"]["n_train"]
    for r in res["runs"]:
        assert r["bptt"] == 8 and r["grad_clip"] == (0.25 if r["optimizer"] == "msgd" else None)
        assert r["steps"] == 2 * math.ceil((n_train // r["batch_size"] - 1) / 8)
        # LambdaLR: lr * cosine_factor(1, 2), and 1 + cos(pi / 2) (~6e-17) rounds to 1: half, exactly
        assert len(r["curves"]) == 2 and r["curves"][1]["lr"] == r["lr"] * 0.5
        for c in r["curves"]:
            assert {"epoch", "lr", "train_loss", "val_loss", "val_ppl", "val_bpc"} <= set(c)
            # the same expressions on the same floats (JSON round-trips them): the same bits
            assert c["val_ppl"] == math.exp(c["val_loss"])
        f = r["final"]
        assert f["test_ppl"] == math.exp(f["test_loss"])
        assert f["test_bpc"] == f["test_loss"] / math.log(2)
        assert "test_loss" not in r["curves"][0]  # test only at the end
    row = res["table"][0]
    assert row["test_ppl_mean"] == row["test_ppl"][0]  # statistics.fmean of one value is that value
    assert os.path.exists(out + ".md") and os.path.exists(out + "_lstm.png")
    os.remove(out + ".md")
    assert _cli().main(["--report-only", "--out", out, "--no-plots"]) == 0  # the task comes from the JSON
    md = open(out + ".md").read()
    assert "| SNGM |" in md and "test ppl / bits per char" in md and "Debian fortunes" in md
    assert "validation loss" in md


def test_cli_full_picks_lowest_validation_loss(corpus, tmp_path):
    out = str(tmp_path / "text_grid")
    rc = _cli().main(["--task", "fortunes", "--data-dir", corpus, "--epochs", "1", "--bptt", "8",
                      "--batch-sizes", "8", "--optimizers", "sngm", "--lr", "sngm@8=0.003,0.1,3", "--seeds", "0",
                      "--extend-edge", "0", "--device", "cpu", "--out", out, "--no-plots"])
    assert rc == 0
    res = json.load(open(out + ".json"))
    (sel,) = res["selection"]
    losses = {r["lr"]: r["final"]["val_loss"] for r in res["runs"] if r["phase"] == "grid"}
    assert sel["grid"] == [0.003, 0.1, 3.0] and len(set(losses.values())) == 3
    assert all(math.isfinite(v) for v in losses.values())
    assert sel["chosen_lr"] == min(losses, key=losses.get) == res["table"][0]["lr"]


def test_cli_refuses_options_of_the_other_task(corpus):
    with pytest.raises(SystemExit):
        _cli().main(["--task", "fortunes", "--data-dir", corpus, "--val-size", "100"])
    with pytest.raises(SystemExit):
        _cli().main(["--bptt", "16"])
    with pytest.raises(SystemExit):
        _cli().main(["--task", "fortunes", "--data-dir", corpus, "--models", "cnn"])
