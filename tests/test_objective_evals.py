"""Evaluation that suits each objective (evaluate/objective_evals.py): masked-token accuracy, MLM loss and
pseudo-log-likelihood bits per byte; ELECTRA's replaced-token detection; span corruption's loss; and the
linear domain probe of every encoder, on tiny run folders trained with the real loop."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from tokenmill import TokenmillError
from tokenmill.evaluate.compare import compare_runs
from tokenmill.evaluate.objective_evals import eval_objective, linear_probe, objective_figures, sampling_seed
from tokenmill.model.build import build_model
from tokenmill.recipe import parse_recipe
from tokenmill.report.compare_report import write_compare
from tokenmill.report.run_report import write_report
from tokenmill.runfolder import ObjectiveResult, RunFolder
from tokenmill.tokens.corruption import required_tokens
from tokenmill.tokens.loader import TokenDataset, eval_windows
from tokenmill.tokens.pack import pack_documents
from tokenmill.tokens.tokenizer import load_tokenizer, train_tokenizer
from tokenmill.train import loop
from tokenmill.train.checkpoint import load_trained_model
from tokenmill.train.objectives import EVAL_G_OFFSET, build_objective

# Two domains that share no word: a probe on any encoder, even an untrained one, tells them apart.
WORDS = ["the cat sat on the mat and looked at the red ball", "a dog ran to the park with the old man",
         "she reads a long book by the warm fire at night", "birds sing in the green trees every morning"]
DIGITS = ["12 + 34 = 46", "7 * 8 = 56", "99 - 11 = 88", "3 * 3 * 3 = 27", "144 / 12 = 12"]
SEQ, WINDOWS = 16, 10


def make_run(root: Path, objective: str, max_steps: int, model: dict | None = None, train: dict | None = None
             ) -> RunFolder:
    """A run folder as the Runner leaves it after training: recipe, tokenizer with the objective's special
    tokens, train and held-out tokens (the same memorisable documents; the digits domain shorter, so it
    has fewer windows), checkpoints and metrics."""
    folder = RunFolder(root)
    folder.create()
    folder.stamp()
    span = {"span_corruption": {"sentinels": 8}} if objective == "span_corruption" else {}
    recipe = {
        "name": root.name, "sources": [{"path": str(root / "unused.jsonl")}],
        "model": {"objective": objective, "dim": 32, "n_layers": 2, "n_heads": 2, "max_seq_len": 32, **span,
                  **(model or {})},
        "train": {"seq_len": SEQ, "micro_batch_size": 8, "global_batch_tokens": 8 * SEQ, "max_steps": max_steps,
                  "lr": 1e-2, "warmup_steps": 3, "device": "cpu", "eval_every": max_steps, "ckpt_every": max_steps,
                  "log_every": max_steps, "eval_windows_per_domain": 4, "bpb_every": None, **(train or {})},
        "eval": {"max_docs_per_domain": WINDOWS, "batch_size": 4},
    }
    folder.recipe.write_text(yaml.safe_dump(recipe))
    r = parse_recipe(recipe)
    tok = train_tokenizer((WORDS + DIGITS) * 5, 300, folder.tokenizer, progress=False,
                          extra_special=required_tokens(objective, r.model.span_corruption))
    rows = [(f"w{i}", t, "words") for i, t in enumerate(WORDS * 12)] + \
           [(f"d{i}", t, "digits") for i, t in enumerate(DIGITS * 3)]
    ids, text, domain = zip(*rows)
    pq.write_table(pa.table({"id": ids, "text": text, "domain": domain}), root / "docs.parquet")
    pack_documents([root / "docs.parquet"], tok, folder.train_tokens)
    pack_documents([root / "docs.parquet"], tok, folder.heldout_tokens)
    cfg = r.model.model_copy(update={"vocab_size": len(tok), "eos_id": tok.eos_token_id,
                                     "pad_id": tok.convert_tokens_to_ids("<pad>")})
    loop.train(cfg, r.train, folder.train_tokens, folder.train, val_tokens_dir=folder.heldout_tokens,
               tokenizer_dir=folder.tokenizer, progress=False)
    return folder


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, RunFolder]:
    """One trained run folder per objective, evaluated once (eval_objective writes eval/objective.json)."""
    root = tmp_path_factory.mktemp("objective_runs")
    folders = {
        # MLM learns from its masked tokens only: more of them per step and more steps, to learn the corpus
        "mlm": make_run(root / "mlm", "mlm", 200, model={"masking": {"mask_rate": 0.4}},
                        train={"micro_batch_size": 16, "global_batch_tokens": 16 * SEQ}),
        "electra": make_run(root / "electra", "electra", 30),
        "span_corruption": make_run(root / "span_corruption", "span_corruption", 30),
    }
    for folder in folders.values():
        eval_objective(folder.root)
    return folders


def _model_and_windows(folder: RunFolder):
    """What eval_objective reads: the trained model, its config, the recipe's train settings, the tokenizer
    and the held-out windows of each domain (whole windows of the objective's length)."""
    model, cfg = load_trained_model(folder.checkpoints)
    recipe = parse_recipe(yaml.safe_load(folder.recipe.read_text()))
    tokenizer = load_tokenizer(folder.tokenizer)
    objective = build_objective(cfg, recipe.train, tokenizer)
    windows = eval_windows(TokenDataset(folder.heldout_tokens), objective.window_len - 1, WINDOWS)
    whole = {d: torch.cat([x, y[:, -1:]], dim=1) for d, (x, y) in windows.items()}
    g = {d: EVAL_G_OFFSET + (i << 24) + np.arange(len(w)) for i, (d, w) in enumerate(whole.items())}
    return model, cfg, recipe, tokenizer, objective, whole, g


def _figures_on_cpu(folder: RunFolder):
    """eval_objective's figures computed here on the CPU (eval_objective runs on a GPU where there is one),
    so that recomputations on the CPU match them to rounding."""
    model, cfg, recipe, tokenizer, *_ = _model_and_windows(folder)
    return objective_figures(model, cfg, recipe.train, tokenizer, TokenDataset(folder.heldout_tokens),
                             max_windows_per_domain=WINDOWS, batch_size=recipe.eval.batch_size)


def test_a_decoder_run_is_sent_to_bits_per_byte(tmp_path):
    folder = RunFolder(tmp_path / "clm")
    folder.create()
    folder.stamp()
    folder.recipe.write_text(yaml.safe_dump({"name": "clm", "sources": [{"path": "x.jsonl"}]}))
    with pytest.raises(TokenmillError, match="eval_bpb"):
        eval_objective(folder.root)


def test_the_result_round_trips_through_its_record(runs):
    for objective, folder in runs.items():
        result = folder.read_objective_eval()
        assert result is not None and result.objective == objective
        assert ObjectiveResult.model_validate_json(folder.objective_eval.read_text()) == result
        assert folder.objective_eval in folder.stage_outputs("eval")
        assert result.settings.step == (200 if objective == "mlm" else 30)
        assert set(result.domains) == {"digits", "words"}
        assert result.overall.windows == sum(s.windows for s in result.domains.values())


def test_masked_accuracy_is_learnt(runs):
    """On a memorisable corpus the trained MLM predicts masked tokens far better than the same model at init."""
    result = runs["mlm"].read_objective_eval()
    model, cfg, recipe, tokenizer, *_ = _model_and_windows(runs["mlm"])
    torch.manual_seed(0)
    untrained = objective_figures(build_model(cfg), cfg, recipe.train, tokenizer,
                                  TokenDataset(runs["mlm"].heldout_tokens), max_windows_per_domain=WINDOWS,
                                  batch_size=4, pll_windows_per_domain=1)
    for figures in (result.overall, untrained.overall, *result.domains.values()):
        assert 0 <= figures.masked_accuracy <= 1 and figures.masked_tokens > 0
    assert result.overall.masked_accuracy > untrained.overall.masked_accuracy + 0.1
    assert result.overall.mlm_loss < untrained.overall.mlm_loss - 1.5
    assert result.overall.pll_bpb < untrained.overall.pll_bpb
    assert untrained.overall.mlm_loss == pytest.approx(math.log(cfg.vocab_size), rel=0.1)  # about uniform


def test_pll_bits_per_byte_equal_a_token_by_token_reference(runs):
    """PLL batched over masked copies (3 a forward pass, so a window's copies split unevenly) equals
    masking each token alone, one forward pass at a time, over the first two windows of a domain."""
    model, cfg, recipe, tokenizer, objective, windows, _ = _model_and_windows(runs["mlm"])
    result = objective_figures(model, cfg, recipe.train, tokenizer, TokenDataset(runs["mlm"].heldout_tokens),
                               max_windows_per_domain=WINDOWS, batch_size=3, pll_windows_per_domain=2)
    special = set(tokenizer.all_special_ids)
    nats, scored, text_bytes = 0.0, 0, 0
    with torch.no_grad():
        for window in windows["words"][:2]:
            for t, token in enumerate(window.tolist()):
                if token in special:
                    continue
                masked = window.clone()
                masked[t] = objective.mask_id
                logits, _ = model(masked[None])
                nats -= logits[0, t, : len(tokenizer)].double().log_softmax(-1)[token].item()
                scored += 1
            text_bytes += len(tokenizer.decode(window.tolist(), skip_special_tokens=True).encode("utf-8"))
    words = result.domains["words"]
    assert (words.pll_windows, words.pll_tokens, words.pll_bytes) == (2, scored, text_bytes)
    assert scored < 2 * windows["words"].shape[1]  # the windows hold an EOS, which is not scored
    assert words.pll_nats == pytest.approx(nats, rel=1e-5)
    assert words.pll_bpb == pytest.approx(nats / math.log(2) / text_bytes, rel=1e-5)
    assert result.overall.pll_windows == 4  # two per domain, as asked


def test_electra_figures_equal_the_models_own_forward(runs):
    """Replaced-token accuracy recomputed window by window through Electra.forward with the same masks and
    the same per-window sampling seeds; the generator's accuracy from its own logits."""
    result = _figures_on_cpu(runs["electra"])
    model, cfg, recipe, tokenizer, objective, windows, g = _model_and_windows(runs["electra"])
    for domain, tokens in windows.items():
        inputs, labels = (torch.from_numpy(a) for a in objective_masks(objective, tokens, g[domain]))
        hits = positions = gen_hits = masked = 0
        with torch.no_grad():
            for i in range(len(tokens)):
                seed = torch.Generator().manual_seed(sampling_seed(recipe.train.seed, int(g[domain][i])))
                out = model(inputs[i:i + 1], labels[i:i + 1], sample_seed=seed)
                hits += out["rtd_accuracy"].item() * tokens.shape[1]
                positions += tokens.shape[1]
                gen_logits, _ = model.generator(inputs[i:i + 1])
                chosen = labels[i] >= 0
                gen_hits += (gen_logits[0, chosen, : len(tokenizer)].argmax(-1) == labels[i, chosen]).sum().item()
                masked += chosen.sum().item()
        figures = result.domains[domain]
        assert figures.rtd_accuracy == pytest.approx(hits / positions, abs=1e-6)
        assert figures.masked_accuracy == pytest.approx(gen_hits / masked) and figures.masked_tokens == masked
        assert 0 < figures.replaced_share <= figures.masked_tokens / figures.tokens
        assert 0 <= figures.rtd_recall <= 1


def objective_masks(objective, tokens: torch.Tensor, g: np.ndarray):
    from tokenmill.tokens.corruption import mask_tokens

    return mask_tokens(tokens.numpy(), g, objective.masking, seed=objective.seed, mask_id=objective.mask_id,
                       vocab_size=objective.vocab_size, special_ids=objective.special_ids)


def test_span_loss_equals_the_models_own_loss(runs):
    from tokenmill.tokens.corruption import span_corrupt

    result = _figures_on_cpu(runs["span_corruption"])
    model, cfg, recipe, tokenizer, o, windows, g = _model_and_windows(runs["span_corruption"])
    for domain, tokens in windows.items():
        enc, targets = (torch.from_numpy(a) for a in span_corrupt(
            tokens.numpy(), g[domain], o.cfg, seed=o.seed, sentinel_ids=o.sentinel_ids, mode_ids=o.mode_ids,
            pad_id=o.pad_id, eos_id=o.eos_id, input_len=o.shapes.input_len, target_len=o.shapes.target_len))
        with torch.no_grad():
            logits, _ = model(enc, targets)
        scored = targets >= 0
        logits = logits[scored][:, : len(tokenizer)]
        figures = result.domains[domain]
        assert figures.target_tokens == scored.sum().item()
        assert figures.span_loss == pytest.approx(torch.nn.functional.cross_entropy(logits, targets[scored]).item(),
                                                  rel=1e-5)
        assert figures.span_accuracy == pytest.approx((logits.argmax(-1) == targets[scored]).float().mean().item())


def test_the_probe_tells_disjoint_domains_apart_against_the_majority_share(runs):
    for folder in runs.values():
        result = folder.read_objective_eval()
        counts = [s.windows for s in result.domains.values()]
        assert counts == [7, 10]  # the digits domain has fewer windows, so the majority share is not 1/2
        assert result.probe.accuracy > 0.9
        assert result.probe.baseline == pytest.approx(10 / 17)
        assert (result.probe.folds, result.probe.windows, result.probe.domains) == (5, 17, 2)


def test_probe_needs_two_windows_per_domain_and_two_domains():
    rng = np.random.default_rng(0)
    features = rng.normal(size=(7, 3))
    assert linear_probe(features, np.zeros(7, int)) is None
    with pytest.raises(TokenmillError, match="code.*single held-out window"):
        linear_probe(features, np.array([0, 0, 0, 0, 0, 0, 1]), ["prose", "code"])
    probe = linear_probe(features, np.array([0, 0, 0, 0, 0, 1, 1]))
    assert probe.folds == 2 and probe.baseline == pytest.approx(5 / 7)


def test_report_shows_the_objective_figures(runs, tmp_path):
    html = write_report(runs["mlm"].root).read_text()
    assert "PLL bits per byte" in html and "Domain probe" in html and "eval/bpb.json" not in html
    html = write_report(runs["span_corruption"].root).read_text()
    assert "target-token accuracy" in html and "eval/bpb.json" not in html
    unevaluated = tmp_path / "electra"
    shutil.copytree(runs["electra"].root, unevaluated, ignore=shutil.ignore_patterns("eval"))
    html = write_report(unevaluated).read_text()
    assert "eval/objective.json" in html and "eval/bpb.json" not in html


def test_compare_reads_the_objective_figures(runs, tmp_path):
    result = compare_runs([f.root for f in runs.values()])
    final, metrics = result["final"]["values"], result["metrics"]
    evaluated = {name: f.read_objective_eval() for name, f in runs.items()}
    assert final["probe_accuracy"] == {n: r.probe.accuracy for n, r in evaluated.items()}
    assert final["pll_bpb"] == {"mlm": evaluated["mlm"].overall.pll_bpb, "electra": None, "span_corruption": None}
    assert final["rtd_accuracy"]["electra"] == evaluated["electra"].overall.rtd_accuracy
    assert final["span_loss"]["span_corruption"] == evaluated["span_corruption"].overall.span_loss
    assert metrics["probe_accuracy"] == {"unit": "", "higher_is_better": True, "comparable": True}
    assert metrics["pll_bpb"]["higher_is_better"] is False and metrics["pll_bpb"]["comparable"]
    assert not metrics["masked_accuracy"]["comparable"]  # an MLM's against an ELECTRA generator's
    assert not metrics["val_loss"]["comparable"] and any("different objectives" in w for w in result["warnings"])
    assert "val_bpb" not in metrics  # a masked token's loss is no code length
    assert "pll_bpb/words" in metrics
    html = write_compare(result, tmp_path).read_text()
    assert "Objective evaluation" in html and "different objectives" in html and "<th>objective</th>" in html
