"""lm-evaluation-harness, offline: any tokenmill model on local YAML tasks, during or after training.

``TokenmillLM`` puts lm_eval's three request types on a plain ``logits_fn(idx) -> logits [B, T, V]``,
so the training loop can evaluate its live model, and loads a tokenmill HF export into tokenmill's
own Llama. ``run_harness`` evaluates either that or, as a cross-check, lm_eval's ``hf`` model on the
same export. Tasks are the bundled ones, those of a folder of YAML files whose ``data_files`` are read
relative to the YAML file, and lm_eval's registered tasks whose data are in the local Hugging Face
cache: the Hugging Face libraries are held offline for the whole run.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Callable, Iterator, Literal

import lm_eval.models  # noqa: F401  (registers lm_eval's own models, "hf" among them)
import numpy as np
import torch
import torch.nn.functional as F
from lm_eval import simple_evaluate
from lm_eval.api.model import LM, TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.loggers import EvaluationTracker
from lm_eval.tasks import TaskManager
from lm_eval.tasks._yaml_loader import load_yaml
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from pydantic import BaseModel, ConfigDict, Field

from tokenmill import TokenmillError

BUNDLED_TASKS = Path(__file__).resolve().parents[1] / "data" / "tasks"
HARNESS_KEYS = ("results", "versions", "n-shot", "higher_is_better", "n-samples")  # per task, kept in harness.json
LogitsFn = Callable[[torch.Tensor], torch.Tensor]
# (context text, continuation text) or None for rolling windows; context tokens; continuation tokens
TokenRequest = tuple[tuple[str, str] | None, list[int], list[int]]


class HarnessConfig(BaseModel):
    """Which lm-evaluation-harness tasks a run evaluates its exported model on, and how."""

    model_config = ConfigDict(extra="forbid")

    tasks: list[str] = Field(["tokenmill_cloze", "tokenmill_realcont"], min_length=1,
                             description="Task names: the bundled tokenmill_cloze and tokenmill_realcont, "
                                         "tasks defined by YAML files in task_dir, or lm_eval's registered "
                                         "tasks whose data are in the local Hugging Face cache.")
    task_dir: str | None = Field(None, description="Folder of extra lm_eval task YAML files whose data are local "
                                                   "files (data_files paths are relative to the YAML file).")
    backend: Literal["tokenmill", "hf"] = Field("tokenmill", description="Load the export into tokenmill's own "
                                                "Llama, or into lm_eval's transformers model ('hf').")
    limit: int | None = Field(None, ge=1, description="Evaluate only the first items of each task (quick checks).")
    batch_size: int = Field(8, ge=1, description="Sequences per forward pass.")


@register_model("tokenmill")
class TokenmillLM(TemplateLM):
    """An lm_eval model over ``logits_fn`` and a Hugging Face tokenizer, or over a tokenmill export.

    Pass ``logits_fn``, ``tokenizer`` and ``max_length`` (the context the model was trained for), or
    ``pretrained`` (an HF export folder, loaded into tokenmill's Llama; the form lm_eval's
    ``model_args`` use). Text is encoded without special tokens and an empty context is the eos token,
    the document boundary tokenmill trains with. A module passed as ``logits_fn`` is put in eval mode
    while it scores and given back in the mode it came in, so the training loop can call this mid-run.
    """

    def __init__(
        self,
        logits_fn: LogitsFn | None = None,
        tokenizer=None,
        max_length: int | None = None,
        pretrained: str | Path | None = None,
        batch_size: int | str = 8,
        device: str | torch.device = "cpu",
        max_gen_toks: int = 256,
    ) -> None:
        super().__init__()
        if (pretrained is None) == (logits_fn is None):
            raise TokenmillError("TokenmillLM: pass either pretrained (an HF export folder) or logits_fn with "
                                 "tokenizer and max_length, not both")
        if not str(batch_size).isdigit() or int(batch_size) < 1:
            raise TokenmillError(f"TokenmillLM: batch_size must be a positive integer, got {batch_size!r}")
        self._device = torch.device(device)
        if pretrained is not None:
            logits_fn, tokenizer, max_length = _load_export(Path(pretrained), self._device, max_length)
        if tokenizer is None or max_length is None:
            raise TokenmillError("TokenmillLM: logits_fn needs a tokenizer and max_length (its context length)")
        if getattr(tokenizer, "eos_token_id", None) is None:
            raise TokenmillError("TokenmillLM: the tokenizer has no eos_token_id; set its eos_token")
        self.logits_fn, self.tokenizer = logits_fn, tokenizer
        self._max_length, self.batch_size, self.max_gen_toks = int(max_length), int(batch_size), int(max_gen_toks)

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.tokenizer.encode(string, add_special_tokens=False)

    def tok_decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens)

    def _loglikelihood_tokens(
        self, requests: list[TokenRequest], disable_tqdm: bool = False
    ) -> list[tuple[float, bool]]:
        """Sum of log p(continuation | context) and whether greedy decoding gives the continuation.

        Context is cut from the left to fit ``max_length``; requests run longest first so each batch
        pads little, and come back in the order given.
        """
        too_long = [i for i, (_, _, continuation) in enumerate(requests) if len(continuation) > self.max_length]
        if too_long:
            raise TokenmillError(f"TokenmillLM: request #{too_long[0]} has a continuation of "
                                 f"{len(requests[too_long[0]][2])} tokens, more than max_length {self.max_length}")
        order = sorted(range(len(requests)), key=lambda i: -len(requests[i][1]) - len(requests[i][2]))
        results: list[tuple[float, bool]] = [(0.0, False)] * len(requests)
        with self._inference():
            for start in range(0, len(order), self.batch_size):
                rows = order[start : start + self.batch_size]
                sequences = [(requests[i][1] + requests[i][2])[-(self.max_length + 1) :] for i in rows]
                inputs = _right_padded([s[:-1] for s in sequences], self.eot_token_id)
                targets = torch.full_like(inputs, -1)
                for r, (seq, i) in enumerate(zip(sequences, rows)):
                    n_cont = len(requests[i][2])
                    targets[r, len(seq) - 1 - n_cont : len(seq) - 1] = torch.tensor(seq[-n_cont:])
                logprobs = F.log_softmax(self._logits(inputs).float(), dim=-1)
                targets = targets.to(logprobs.device)
                scored = targets >= 0
                token_logprobs = logprobs.gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1)
                totals = torch.where(scored, token_logprobs.double(), 0.0).sum(dim=1).tolist()
                greedy = ((logprobs.argmax(dim=-1) == targets) | ~scored).all(dim=1).tolist()
                for r, i in enumerate(rows):
                    results[i] = (totals[r], greedy[r])
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of each whole text from the eos boundary, in disjoint ``max_length`` windows
        (lm_eval's own windowing, so every token is scored once)."""
        windows: list[TokenRequest] = []
        owner: list[int] = []
        for index, (text,) in enumerate(req.args for req in requests):
            for context, continuation in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None, context, continuation))
                owner.append(index)
        scores = [logprob for logprob, _ in self._loglikelihood_tokens(windows)]
        return np.bincount(np.array(owner, dtype=np.int64), weights=scores, minlength=len(requests)).tolist()

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy continuation of each context, cut at the first stop sequence (``until``, and always
        the eos text) or after ``max_gen_toks`` tokens."""
        outputs = []
        for start in range(0, len(requests), self.batch_size):
            batch = [req.args for req in requests[start : start + self.batch_size]]
            outputs += self._generate_batch([context for context, _ in batch], [kw for _, kw in batch])
        return outputs

    def _generate_batch(self, contexts: list[str], gen_kwargs: list[dict]) -> list[str]:
        stops, budgets = [], []
        for kwargs in gen_kwargs:
            if kwargs.get("do_sample") or (kwargs.get("temperature") or 0.0) > 0:
                raise TokenmillError("TokenmillLM.generate_until decodes greedily only; set do_sample: false "
                                     "and temperature: 0 in the task's generation_kwargs")
            until = kwargs.get("until") or []
            stops.append([*([until] if isinstance(until, str) else until), self.tok_decode([self.eot_token_id])])
            budgets.append(int(kwargs.get("max_gen_toks", self.max_gen_toks)))
        max_new = max(budgets)
        if max_new >= self.max_length:
            raise TokenmillError(f"TokenmillLM: max_gen_toks {max_new} leaves no room for context within "
                                 f"max_length {self.max_length}")
        prompts = [self.tok_encode(c)[-(self.max_length - max_new) :] or [self.eot_token_id] for c in contexts]
        tokens = _right_padded(prompts, self.eot_token_id, width=max(map(len, prompts)) + max_new)
        lengths = torch.tensor([len(p) for p in prompts])
        active = torch.ones(len(prompts), dtype=torch.bool)
        rows = torch.arange(len(prompts))
        texts = [""] * len(prompts)
        with self._inference():
            for step in range(max_new):
                logits = self._logits(tokens[:, : int(lengths.max())])
                next_tokens = logits[rows, lengths - 1, : len(self.tokenizer)].argmax(dim=-1).cpu()
                tokens[rows[active], lengths[active]] = next_tokens[active]
                lengths += active
                for r in rows[active].tolist():
                    texts[r] = self.tok_decode(tokens[r, len(prompts[r]) : lengths[r]].tolist())
                    if step + 1 >= budgets[r] or any(s and s in texts[r] for s in stops[r]):
                        active[r] = False
                if not active.any():
                    break
        return [_cut_at_first(text, stop) for text, stop in zip(texts, stops)]

    def _logits(self, idx: torch.Tensor) -> torch.Tensor:
        logits = self.logits_fn(idx.to(self._device))
        return getattr(logits, "logits", logits)  # a Hugging Face model passed directly

    @contextlib.contextmanager
    def _inference(self) -> Iterator[None]:
        """No gradients, and a module in eval mode for the duration (restored after: in-loop use)."""
        module = self.logits_fn if isinstance(self.logits_fn, torch.nn.Module) else None
        was_training = module is not None and module.training
        if module is not None:
            module.eval()
        try:
            with torch.inference_mode():
                yield
        finally:
            if was_training:
                module.train()


def run_harness(
    model: str | Path | LM,
    tasks: list[str],
    task_dir: Path | None = None,
    *,
    backend: Literal["tokenmill", "hf"] = "tokenmill",
    limit: int | None = None,
    num_fewshot: int | None = None,
    batch_size: int = 8,
    device: str = "cpu",
    log_samples: bool = False,
    output_path: Path | None = None,
    bootstrap_iters: int = 1000,
) -> dict:
    """Evaluate ``model`` on ``tasks`` with lm_eval, offline; return its JSON-ready results.

    ``model`` is a ready lm_eval model (e.g. a ``TokenmillLM`` over the live training model) or an HF
    export folder, loaded by ``backend``: ``"tokenmill"`` (tokenmill's Llama) or ``"hf"`` (lm_eval's
    transformers model). Tasks are the bundled ones, those in ``task_dir`` and lm_eval's registered
    ones; ``num_fewshot`` overrides the tasks' own. The result holds ``results`` ({task: {metric,filter:
    value}}), ``versions``, ``n-shot``, ``higher_is_better``, ``n-samples``, and with ``log_samples`` the
    per-item ``samples``. With ``output_path``, lm_eval also writes its own result (and samples) files
    there, as its command line does.
    """
    task_manager = _task_manager(tasks, task_dir)
    specs = [_task_spec(task_manager, name, task_dir) for name in tasks]
    if isinstance(model, LM):
        model_args = None
    else:
        model_args = _model_args(Path(model), backend)
        model = backend
    tracker = EvaluationTracker(output_path=str(output_path)) if output_path else None
    with _offline():
        loaded = [task for spec, name in zip(specs, tasks) for task in _load_task(task_manager, spec, name)]
        results = simple_evaluate(model=model, model_args=model_args, tasks=loaded, limit=limit,
                                  num_fewshot=num_fewshot, batch_size=batch_size, device=device,
                                  task_manager=task_manager, log_samples=log_samples,
                                  evaluation_tracker=tracker, bootstrap_iters=bootstrap_iters)
    if tracker is not None:
        samples = results.get("samples")
        tracker.save_results_aggregated(results={k: v for k, v in results.items() if k != "samples"},
                                        samples=samples)
        for task in samples or {}:
            tracker.save_results_samples(task_name=task, samples=samples[task])
    keep = [*HARNESS_KEYS, *(["samples"] if log_samples else [])]
    return {key: results[key] for key in keep}


def merge_results(previous: dict | None, result: dict, options: dict) -> dict:
    """``previous`` (a ``harness.json``) with the tasks of ``result`` replaced or added, each recorded with
    the ``options`` it was run with: evaluating one task never loses another's results."""
    merged = {key: dict((previous or {}).get(key, {})) for key in (*HARNESS_KEYS, "options")}
    if not all(isinstance(value, dict) for value in merged["options"].values()):  # one set for all tasks: older files
        merged["options"] = dict.fromkeys(merged["results"], merged["options"])
    for task in result["results"]:
        for key in merged:
            merged[key].pop(task, None)
        merged["options"][task] = options
    for key in HARNESS_KEYS:
        merged[key].update(result[key])
    return merged


def _load_export(path: Path, device: torch.device, max_length: int | None):
    """tokenmill's Llama and the tokenizer from an HF export folder."""
    from transformers import AutoTokenizer

    from tokenmill.model.hf import import_hf

    model, cfg = import_hf(path)
    return model.to(device).eval(), AutoTokenizer.from_pretrained(path), max_length or cfg.max_seq_len


def _model_args(path: Path, backend: str) -> dict:
    if backend not in ("tokenmill", "hf"):
        raise TokenmillError(f"run_harness: backend must be 'tokenmill' or 'hf', got {backend!r}")
    if not (path / "config.json").is_file():
        raise TokenmillError(f"run_harness: {path} has no config.json; pass a Hugging Face export folder "
                             f"(a run's model/ folder) or an lm_eval model object")
    return {"pretrained": str(path)} | ({"dtype": "float32"} if backend == "hf" else {})


def _task_manager(tasks: list[str], task_dir: Path | None) -> TaskManager:
    """The bundled tasks and ``task_dir``'s, and lm_eval's registered ones only when a name needs them:
    indexing those takes seconds."""
    include = [BUNDLED_TASKS, *([Path(task_dir)] if task_dir else [])]
    local = TaskManager(include_path=include, include_defaults=False)
    return local if all(name in local.task_index for name in tasks) else TaskManager(include_path=include)


def _task_spec(task_manager: TaskManager, name: str, task_dir: Path | None) -> str | dict:
    """A ``task_dir`` task's config with its ``data_files`` made absolute against its YAML file (lm_eval
    would read them relative to the working directory); other tasks, groups and tags pass by name."""
    entry = task_manager.task_index.get(name)
    if entry is None:
        raise TokenmillError(f"run_harness: no task {name!r} among the bundled tasks, task_dir's and lm_eval's "
                             f"registered ones (`lm-eval ls tasks` lists those)")
    if (task_dir is None or entry.yaml_path is None or name not in task_manager.all_subtasks
            or not Path(entry.yaml_path).resolve().is_relative_to(Path(task_dir).resolve())):
        return name
    config = load_yaml(entry.yaml_path, resolve_func=True)
    files = config.get("dataset_kwargs", {}).get("data_files")
    if files is not None:
        config["dataset_kwargs"]["data_files"] = _resolve(files, Path(entry.yaml_path).parent)
    return config


def _load_task(task_manager: TaskManager, spec: str | dict, name: str) -> list:
    """The task, group or tagged tasks ``spec`` names, its data loaded; a dataset neither local nor in the
    Hugging Face cache is an error naming the task."""
    try:
        loaded = task_manager.load(spec)
    except (ConnectionError, FileNotFoundError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise TokenmillError(f"run_harness: task {name!r}: its data isn't available offline ({reason})") from None
    top = loaded["groups"].get(name, loaded["tasks"].get(name))
    return list(loaded["tasks"].values()) if top is None else [top]


def _resolve(files, base: Path):
    if isinstance(files, dict):
        return {split: _resolve(f, base) for split, f in files.items()}
    if isinstance(files, list):
        return [_resolve(f, base) for f in files]
    return str(base / files)


@contextlib.contextmanager
def _offline() -> Iterator[None]:
    """Hold ``datasets`` and ``huggingface_hub`` offline: both read the switch at import time, so set
    their module flags as well as the environment, and put everything back afterwards."""
    import datasets.config
    import huggingface_hub.constants

    flags = [(module, name) for module, name in ((datasets.config, "HF_DATASETS_OFFLINE"),
             (datasets.config, "HF_HUB_OFFLINE"), (huggingface_hub.constants, "HF_HUB_OFFLINE"))
             if hasattr(module, name)]
    saved_flags = [getattr(module, name) for module, name in flags]
    saved_env = {key: os.environ.get(key) for key in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")}
    os.environ.update({key: "1" for key in saved_env})
    for module, name in flags:
        setattr(module, name, True)
    try:
        yield
    finally:
        for (module, name), value in zip(flags, saved_flags):
            setattr(module, name, value)
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _right_padded(sequences: list[list[int]], pad: int, width: int | None = None) -> torch.Tensor:
    out = torch.full((len(sequences), width or max(map(len, sequences))), pad, dtype=torch.long)
    for r, seq in enumerate(sequences):
        out[r, : len(seq)] = torch.tensor(seq, dtype=torch.long)
    return out


def _cut_at_first(text: str, stops: list[str]) -> str:
    cuts = [text.index(s) for s in stops if s and s in text]
    return text[: min(cuts)] if cuts else text
