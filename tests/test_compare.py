"""`tokenmill compare`: equal-tokens and equal-compute views, selection cost, tokenizer mismatch, the fit.

Run folders here are made by hand with the files training and evaluation leave (no training), with
validation losses that are exact functions of the token count, so every interpolated value is known.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import yaml

from tokenmill import TokenmillError
from tokenmill.cli import main
from tokenmill.evaluate.compare import compare_runs
from tokenmill.runfolder import RunFolder

DOMAINS = {"bible": {"docs": 6, "tokens": 3_000, "bytes": 12_000},
           "code": {"docs": 4, "tokens": 5_000, "bytes": 10_000}}


def loss_curve(scale: float):
    """A validation loss linear in log tokens, so interpolation in log tokens is exact."""
    return lambda tokens, domain: scale * (9.0 - 0.5 * math.log(tokens)) + (0.3 if domain == "code" else 0.0)


def fake_run(root: Path, *, evals: list[int], curve=loss_curve(1.0), dim: int = 32, fingerprint: str = "tok-a",
             select_cost: dict | None = None, harness_acc: float | None = None) -> Path:
    """A run folder as `tokenmill run` leaves it, as far as compare reads it."""
    recipe = {"name": root.name, "sources": [{"path": "corpus.jsonl"}],
              "model": {"dim": dim, "n_layers": 2, "n_heads": 2, "max_seq_len": 64},
              "train": {"seq_len": 64, "micro_batch_size": 4, "global_batch_tokens": 256}}
    (root / "train").mkdir(parents=True)
    RunFolder(root).stamp()
    (root / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    records = [{"step": t // 256, "tokens": t, "loss": curve(t, "bible") + 0.1} for t in range(256, evals[-1] + 1, 256)]
    for t in evals:
        val = {f"val_loss/{d}": curve(t, d) for d in DOMAINS}
        records.append({"step": t // 256, "tokens": t, **val, "val_loss": sum(val.values()) / len(val)})
        bpb = {f"bpb/{d}": curve(t, d) / 2 for d in DOMAINS}  # the trainer's in-loop bits per byte
        records.append({"step": t // 256, "tokens": t, **bpb, "bpb": min(bpb.values())})
    (root / "train" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    for split, domains in (("train", DOMAINS), ("heldout", DOMAINS)):
        (root / "tokens" / split).mkdir(parents=True)
        meta = {"vocab_size": 512, "eos_id": 0, "tokenizer_fingerprint": fingerprint, "domains": domains,
                "n_tokens": sum(d["tokens"] for d in domains.values())}
        (root / "tokens" / split / "meta.json").write_text(json.dumps(meta))
    (root / "eval").mkdir()
    bpb = {d: {"bpb": 1.0 + i + evals[-1] / 1e5, "docs": 2, "bytes": s["bytes"], "tokens": s["tokens"],
               "nll_bits": 1.0} for i, (d, s) in enumerate(DOMAINS.items())}
    (root / "eval" / "bpb.json").write_text(json.dumps(
        {"domains": bpb, "overall": bpb["bible"], "macro_bpb": sum(s["bpb"] for s in bpb.values()) / len(bpb)}))
    if harness_acc is not None:
        (root / "eval" / "harness.json").write_text(json.dumps({
            "options": {"backend": "tokenmill", "limit": None},
            "results": {"cloze": {"alias": "cloze", "acc,none": harness_acc, "acc_stderr,none": 0.01,
                                  "perplexity,none": 1 / harness_acc, "perplexity_stderr,none": "N/A"}},
            "higher_is_better": {"cloze": {"acc": True, "perplexity": False}}}))
    if select_cost is not None:
        (root / "select_cost.json").write_text(json.dumps(select_cost))
    return root


def test_equal_tokens_interpolates_in_log_tokens(tmp_path):
    a = fake_run(tmp_path / "a", evals=[512, 1024, 2048])
    b = fake_run(tmp_path / "b", evals=[768, 2304, 4096], curve=loss_curve(0.9))
    result = compare_runs([a, b])
    view = result["equal_tokens"]
    assert view["tokens"] == 2048  # the most tokens both runs reached
    for metric, domain in (("val_loss/bible", "bible"), ("val_loss/code", "code")):
        assert view["values"][metric]["a"] == pytest.approx(loss_curve(1.0)(2048, domain))
        assert view["values"][metric]["b"] == pytest.approx(loss_curve(0.9)(2048, domain))  # between 768 and 2304
    assert result["final"]["values"]["val_loss/bible"]["b"] == pytest.approx(loss_curve(0.9)(4096, "bible"))
    assert view["values"]["bpb/code"]["b"] == pytest.approx(loss_curve(0.9)(2048, "code") / 2)
    # eval/bpb.json is one point at each run's end: only run a ends at 2048
    assert view["values"]["eval_bpb/bible"]["a"] is not None and view["values"]["eval_bpb/bible"]["b"] is None


def test_bits_per_byte_curves_come_from_heldout_tokens_per_byte(tmp_path):
    a = fake_run(tmp_path / "a", evals=[512, 1024])
    b = fake_run(tmp_path / "b", evals=[512, 1024])
    series = compare_runs([a, b])["series"]["a"]
    for domain, stats in DOMAINS.items():
        for (t, bpb), (t2, loss) in zip(series[f"val_bpb/{domain}"], series[f"val_loss/{domain}"]):
            assert t == t2 and bpb == pytest.approx(loss * stats["tokens"] / stats["bytes"] / math.log(2))
    mean = [sum(series[f"val_bpb/{d}"][i][1] for d in DOMAINS) / len(DOMAINS) for i in range(2)]
    assert [v for _, v in series["val_bpb"]] == pytest.approx(mean)


def test_equal_compute_charges_model_flops_and_selection_cost(tmp_path):
    small = fake_run(tmp_path / "small", evals=[1024, 2048, 4096], dim=32)
    big = fake_run(tmp_path / "big", evals=[1024, 2048, 4096], dim=64)
    RunFolder(big).write_select_cost(flops=2e8, seconds=3.5)
    result = compare_runs([small, big])
    runs = {r["name"]: r for r in result["runs"]}
    for r in runs.values():  # 6·N plus attention 12·L·dim·T (n_layers 2, seq_len 64)
        dim = 32 if r["name"] == "small" else 64
        assert r["flops_per_token"] == 6 * r["params"] + 12 * 2 * dim * 64
    assert runs["big"]["params"] > runs["small"]["params"]
    assert runs["big"]["select_flops"] == 2e8 and runs["big"]["select_seconds"] == 3.5
    assert runs["big"]["flops"] == pytest.approx(2e8 + runs["big"]["flops_per_token"] * 4096)
    budget = min(r["flops"] for r in runs.values())
    assert result["equal_compute"]["flops"] == pytest.approx(budget)
    for name, r in runs.items():
        tokens = (budget - r["select_flops"]) / r["flops_per_token"]
        value = result["equal_compute"]["values"]["val_loss/bible"][name]
        if tokens < 1024:  # before the first evaluation: no value rather than an extrapolated one
            assert value is None
        else:
            assert value == pytest.approx(loss_curve(1.0)(tokens, "bible"))
    assert result["equal_compute"]["values"]["val_loss/bible"]["small"] == pytest.approx(loss_curve(1.0)(4096, "bible"))


def test_mismatched_tokenizers_flag_loss_per_token_but_not_bits_per_byte(tmp_path, capsys):
    a = fake_run(tmp_path / "a", evals=[512, 1024], fingerprint="tok-a")
    b = fake_run(tmp_path / "b", evals=[512, 1024], fingerprint="tok-b")
    assert main(["compare", str(a), str(b), "--out", str(tmp_path / "cmp")]) == 0
    out = capsys.readouterr().out
    assert "tok-a" in out and "tok-b" in out and "not comparable" in out
    result = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert result["same_tokenizer"] is False
    assert all(not info["comparable"] for m, info in result["metrics"].items() if m.startswith("val_loss"))
    assert all(info["comparable"] for m, info in result["metrics"].items() if "bpb" in m)
    page = (tmp_path / "cmp" / "compare.html").read_text()
    loss_row = re.search(r"<tr><td>val_loss/bible</td>.*?</tr>", page).group(0)
    assert loss_row.count('class="not-comparable"') == 6  # 2 runs × 3 views
    assert 'class="not-comparable"' not in re.search(r"<tr><td>val_bpb/bible</td>.*?</tr>", page).group(0)


def test_compare_page_is_self_contained_and_marks_the_best(tmp_path):
    a = fake_run(tmp_path / "a", evals=[512, 1024], harness_acc=0.4)
    b = fake_run(tmp_path / "b", evals=[512, 1024], curve=loss_curve(0.9), harness_acc=0.6)
    assert main(["compare", str(a), str(b), "--out", str(tmp_path / "cmp")]) == 0
    result = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert result["same_tokenizer"] is True and result["warnings"] == []
    assert result["equal_tokens"]["values"]["cloze/acc"] == {"a": 0.4, "b": 0.6}
    assert result["metrics"]["cloze/acc"]["higher_is_better"] is True
    assert result["metrics"]["cloze/perplexity"]["higher_is_better"] is False
    page = (tmp_path / "cmp" / "compare.html").read_text()
    assert not re.search(r"""(src|href)=["'](?!data:|#)""", page) and "http" not in page
    assert page.count("data:image/png;base64,") == 3  # validation loss, bits per byte, harness
    acc_row = re.search(r"<tr><td>cloze/acc</td>.*?</tr>", page).group(0)
    assert acc_row.count('<td class="best">0.6000</td>') == 2  # equal tokens and equal compute
    ppl_row = re.search(r"<tr><td>cloze/perplexity</td>.*?</tr>", page).group(0)
    assert ppl_row.count(f'<td class="best">{1 / 0.6:.4f}</td>') == 2  # lower is better


def test_fit_recovers_a_data_scaling_law(tmp_path, capsys):
    E, B, beta = 2.0, 40.0, 0.5
    runs = [fake_run(tmp_path / f"r{i}", evals=[d], curve=lambda t, _d: E + B / t**beta)
            for i, d in enumerate([1024, 2048, 4096, 8192, 16384, 32768])]
    assert main(["compare", *map(str, runs), "--out", str(tmp_path / "cmp"), "--fit", "--bootstrap", "8"]) == 0
    fit = json.loads((tmp_path / "cmp" / "compare.json").read_text())["fit"]
    assert fit["law"] == "data" and fit["target"] == "val_loss"
    assert fit["params"]["E"] == pytest.approx(E, rel=0.05)
    assert fit["params"]["beta"] == pytest.approx(beta, rel=0.1)
    assert set(fit["intervals"]) == {"E", "B", "beta"}
    for p in fit["points"]:
        assert p["predicted"] == pytest.approx(p["observed"], rel=0.01)
    assert "L(D) = E + B / D^beta" in capsys.readouterr().out
    assert 'id="fit"' in (tmp_path / "cmp" / "compare.html").read_text()


def test_bad_inputs_are_clear_errors(tmp_path, capsys):
    a = fake_run(tmp_path / "a", evals=[512])
    with pytest.raises(TokenmillError, match="at least two"):
        compare_runs([a])
    with pytest.raises(TokenmillError, match="no recipe.yaml"):
        compare_runs([a, tmp_path / "missing"])
    b = fake_run(tmp_path / "b", evals=[512], select_cost={"flops": -1, "seconds": 2, "cost": 3})
    assert main(["compare", str(a), str(b), "--out", str(tmp_path / "cmp")]) == 2
    err = capsys.readouterr().err
    assert "select_cost.json" in err and "flops" in err and "cost" in err
    c = fake_run(tmp_path / "c", evals=[512])
    with pytest.raises(TokenmillError, match="need at least 4 runs"):
        compare_runs([a, c], fit=True, n_bootstrap=2)
