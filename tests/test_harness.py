"""lm-evaluation-harness integration: offline end to end, tokenmill and hf backends agree, requests right."""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import demo_docs
from lm_eval.api.instance import Instance
from lm_eval.models.huggingface import HFLM
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from tokenmill import TokenmillError
from tokenmill.documents.ingest import HeldoutConfig, choose_heldout
from tokenmill.evaluate.harness import BUNDLED_TASKS, TokenmillLM, merge_results, run_harness

EOS = "<|endoftext|>"
BUNDLED = ["tokenmill_cloze", "tokenmill_realcont"]


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> Path:
    """A tokenmill-style HF export: a random tiny Llama and a byte-level BPE trained on the demo corpus."""
    texts = [doc["text"][:3000] for domain in ("bible", "shakespeare", "python_docs")
             for doc in demo_docs(domain, 20)]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=800, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(texts, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=EOS, bos_token=EOS)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
                         bos_token_id=None, eos_token_id=tokenizer.eos_token_id)
    out = tmp_path_factory.mktemp("export")
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def loaded(export: Path):
    return LlamaForCausalLM.from_pretrained(export).eval(), PreTrainedTokenizerFast.from_pretrained(export)


def loglikelihoods(result: dict, task: str) -> dict[tuple[int, int], float]:
    return {(s["doc_id"], i): resp[0][0] for s in result["samples"][task] for i, resp in enumerate(s["resps"])}


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_bundled_tasks_run_offline_and_backends_agree(export, no_network):
    before = {key: os.environ.get(key) for key in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")}
    ours = run_harness(export, BUNDLED, backend="tokenmill", limit=10, batch_size=4, log_samples=True)
    theirs = run_harness(export, BUNDLED, backend="hf", limit=10, batch_size=4, log_samples=True)

    assert {key: os.environ.get(key) for key in before} == before
    for result in (ours, theirs):
        assert {"perplexity,none", "acc,none"} <= set(result["results"]["tokenmill_cloze"])
        assert {"acc,none", "acc_norm,none"} <= set(result["results"]["tokenmill_realcont"])
        assert all(n["effective"] == 10 for n in result["n-samples"].values())
        json.dumps(result)  # ready for eval/results.json
    for task in BUNDLED:
        ours_ll, theirs_ll = loglikelihoods(ours, task), loglikelihoods(theirs, task)
        assert len(ours_ll) == (10 if task == "tokenmill_cloze" else 40)
        assert ours_ll.keys() == theirs_ll.keys()
        for key, value in ours_ll.items():
            assert value == pytest.approx(theirs_ll[key], abs=1e-4)
    assert ours["results"]["tokenmill_realcont"]["acc,none"] == theirs["results"]["tokenmill_realcont"]["acc,none"]


def test_bundled_tasks_run_under_the_lm_eval_cli_from_any_folder(export, tmp_path):
    """lm_eval's own command, started outside the tasks folder, finds the bundled tasks' data."""
    command = [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args", f"pretrained={export},dtype=float32",
               "--tasks", ",".join(BUNDLED), "--include_path", str(BUNDLED_TASKS), "--limit", "2", "--device", "cpu",
               "--output_path", str(tmp_path / "out")]
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True)

    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(next((tmp_path / "out").rglob("results_*.json")).read_text())
    assert {task: n["effective"] for task, n in result["n-samples"].items()} == dict.fromkeys(BUNDLED, 2)
    assert "acc,none" in result["results"]["tokenmill_cloze"]


def _cache_lambada(cache: Path, texts: list[str]) -> None:
    """Put lm_eval's registered ``lambada_openai`` data into a Hugging Face datasets cache, as a download
    once left it."""
    import datasets
    from datasets.arrow_writer import ArrowWriter

    folder = cache / "EleutherAI___lambada_openai" / "default" / "0.0.0" / "0123456789abcdef"
    folder.mkdir(parents=True)
    table = datasets.Dataset.from_list([{"text": text} for text in texts])
    with ArrowWriter(path=str(folder / "lambada_openai-test.arrow")) as writer:
        writer.write_table(table.data.table)
        writer.finalize()
    split = datasets.SplitInfo("test", num_examples=len(texts), dataset_name="lambada_openai")
    datasets.DatasetInfo(features=table.features, config_name="default", dataset_name="lambada_openai",
                         splits=datasets.SplitDict({"test": split})).write_to_directory(str(folder))


def test_registered_lm_eval_tasks_run_from_the_local_cache_or_say_their_data_is_missing(
        export, tmp_path, monkeypatch, no_network):
    import datasets.config

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    with pytest.raises(TokenmillError, match=r"^run_harness: task 'lambada_openai': its data isn't available "
                                             r"offline \(.*\)$"):
        run_harness(export, ["lambada_openai"], limit=2)

    _cache_lambada(tmp_path / "cache", [line for line in demo_docs("bible", 1)[0]["text"].splitlines()
                                        if len(line) > 40][:3])
    result = run_harness(export, ["tokenmill_cloze", "lambada_openai"], limit=2, num_fewshot=1,
                         output_path=tmp_path / "out")

    assert {task: n["effective"] for task, n in result["n-samples"].items()} == {"tokenmill_cloze": 2,
                                                                                 "lambada_openai": 2}
    assert result["n-shot"] == {"tokenmill_cloze": 1, "lambada_openai": 1}
    assert {"acc,none", "perplexity,none"} <= set(result["results"]["lambada_openai"])
    written = json.loads(next((tmp_path / "out").rglob("results_*.json")).read_text())
    assert written["results"] == json.loads(json.dumps(result["results"]))


def test_merged_results_keep_other_tasks_and_upgrade_one_set_of_options_to_one_per_task():
    def result(task: str, acc: float) -> dict:
        return {"results": {task: {"acc,none": acc}}, "versions": {task: 1.0}, "n-shot": {task: 0},
                "higher_is_better": {task: {"acc": True}}, "n-samples": {task: {"original": 9, "effective": 3}}}

    older = {"options": {"tasks": ["a", "b"], "task_dir": None, "backend": "hf", "limit": 3},
             **{key: {**result("a", 0.1)[key], **result("b", 0.2)[key]} for key in result("a", 0)}}
    merged = merge_results(older, result("b", 0.5), {"backend": "tokenmill", "limit": None})

    assert merged["results"] == {"a": {"acc,none": 0.1}, "b": {"acc,none": 0.5}}
    assert merged["options"] == {"a": {"tasks": ["a", "b"], "task_dir": None, "backend": "hf", "limit": 3},
                                 "b": {"backend": "tokenmill", "limit": None}}
    assert merge_results(None, result("c", 0.3), {"limit": 1}) == {**result("c", 0.3), "options": {"c": {"limit": 1}}}


def test_user_tasks_with_the_live_training_model(export, tmp_path, no_network):
    """A task folder of one's own (data next to the YAML), scored by a model in training mode."""
    lines = [line for line in demo_docs("bible", 1)[0]["text"].splitlines() if len(line) > 40][:4]
    rows = [{"text": t, "prompt": t[:30], "answer": t[30:]} for t in lines]
    (tmp_path / "lines.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    common = "dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: lines.jsonl\ntest_split: test\n"
    (tmp_path / "rolling.yaml").write_text(
        f"task: lines_rolling\n{common}output_type: loglikelihood_rolling\ndoc_to_text: ''\ndoc_to_target: text\n"
        "metric_list:\n  - metric: bits_per_byte\n")
    (tmp_path / "generate.yaml").write_text(
        f"task: lines_generate\n{common}output_type: generate_until\ndoc_to_text: prompt\ndoc_to_target: answer\n"
        "generation_kwargs:\n  until: [\"\\n\"]\n  max_gen_toks: 12\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n")
    model, tokenizer = loaded(export)
    model.train()
    live = TokenmillLM(model, tokenizer, max_length=512, batch_size=3)

    ours = run_harness(live, ["lines_rolling", "lines_generate"], tmp_path, log_samples=True)
    theirs = run_harness(export, ["lines_rolling", "lines_generate"], tmp_path, backend="hf", log_samples=True)

    assert model.training
    assert "bits_per_byte,none" in ours["results"]["lines_rolling"]
    assert "exact_match,none" in ours["results"]["lines_generate"]
    rolling = [(s["resps"][0][0], t["resps"][0][0]) for s, t in
               zip(ours["samples"]["lines_rolling"], theirs["samples"]["lines_rolling"])]
    assert len(rolling) == 4 and all(a == pytest.approx(b, abs=1e-4) for a, b in rolling)
    generated = [s["resps"][0][0] for s in ours["samples"]["lines_generate"]]
    assert generated == [t["resps"][0][0] for t in theirs["samples"]["lines_generate"]]
    assert all("\n" not in text for text in generated)


def test_rolling_windows_match_lm_eval_when_texts_exceed_the_context(export):
    model, tokenizer = loaded(export)
    text = demo_docs("shakespeare", 1)[0]["text"][:600]
    requests = [Instance("loglikelihood_rolling", {}, (t,), i) for i, t in enumerate([text, "Amen."])]

    ours = TokenmillLM(model, tokenizer, max_length=24, batch_size=5).loglikelihood_rolling(requests)
    reference = HFLM(pretrained=model, tokenizer=tokenizer, max_length=24, batch_size=5)
    theirs = reference.loglikelihood_rolling(requests, disable_tqdm=True)

    assert len(tokenizer.encode(text)) > 5 * 24
    assert ours == pytest.approx(theirs, abs=1e-4)


def test_generate_until_is_greedy_and_stops(export):
    model, tokenizer = loaded(export)
    lm = TokenmillLM(model, tokenizer, max_length=512, batch_size=2)
    prompts = ["In the beginning God created", "To be, or not to be"]
    greedy = []
    for prompt in prompts:
        ids = tokenizer.encode(prompt)
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), max_new_tokens=10, do_sample=False,
                                 pad_token_id=tokenizer.eos_token_id)
        greedy.append(tokenizer.decode(out[0, len(ids) :]).split(EOS)[0])  # eos always stops generation
    stop = greedy[0][4:7]

    def generate(prompt: str, **kwargs) -> str:
        return lm.generate_until([Instance("generate_until", {}, (prompt, kwargs), 0)])[0]

    assert [generate(p, until=[], max_gen_toks=10) for p in prompts] == greedy
    assert generate(prompts[0], until=[stop], max_gen_toks=10) == greedy[0][: greedy[0].index(stop)]
    assert greedy[0].startswith(generate(prompts[0], until=[], max_gen_toks=3))
    with pytest.raises(TokenmillError, match="greedily"):
        generate(prompts[0], do_sample=True, temperature=0.7)


def test_refuses_bad_input(export, tmp_path):
    model, tokenizer = loaded(export)
    with pytest.raises(TokenmillError, match="no task 'nope'"):
        run_harness(export, ["nope"])
    with pytest.raises(TokenmillError, match="no config.json"):
        run_harness(tmp_path, BUNDLED)
    with pytest.raises(TokenmillError, match="backend"):
        run_harness(export, BUNDLED, backend="vllm")
    with pytest.raises(TokenmillError, match="either pretrained"):
        TokenmillLM(model, tokenizer, max_length=64, pretrained=export)
    with pytest.raises(TokenmillError, match="max_length"):
        TokenmillLM(model, tokenizer)


def test_bundled_task_data_rebuild_identically_from_held_out_documents(tmp_path):
    spec = importlib.util.spec_from_file_location("build_tasks", BUNDLED_TASKS / "build_tasks.py")
    build_tasks = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build_tasks)

    counts = build_tasks.build(tmp_path)

    docs = {doc["id"]: (domain, doc["text"]) for domain in ("bible", "shakespeare", "python_docs")
            for doc in demo_docs(domain)}
    held = choose_heldout([(doc_id, domain) for doc_id, (domain, _) in docs.items()], HeldoutConfig())
    for name, count in counts.items():
        assert (tmp_path / f"{name}.jsonl.gz").read_bytes() == (BUNDLED_TASKS / f"{name}.jsonl.gz").read_bytes()
        with gzip.open(tmp_path / f"{name}.jsonl.gz", "rt", encoding="utf-8") as fh:
            items = [json.loads(line) for line in fh]
        assert 100 <= count == len(items) <= 200
        assert {item["doc_id"] for item in items} <= held
        assert {item["domain"] for item in items[:10]} == {"bible", "shakespeare", "python_docs"}
        for item in items:
            if name == "cloze":
                answer = item["target"]
                assert answer.startswith(" ") and answer[1:].isalpha()
            else:
                assert len(set(item["choices"])) == 4
                answer = item["choices"][item["label"]]
            assert item["context"] + answer in docs[item["doc_id"]][1]  # the real continuation
