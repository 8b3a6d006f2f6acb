"""Generation tasks of ``scripts/finetune.py`` (:data:`GENERATION_TASKS`).

| task              | source -> target                   | data                     | best     |
|-------------------|------------------------------------|--------------------------|----------|
| ``bbc-headline``  | BBC story body -> title            | embedded, k-shot         | rougeL   |
| ``cnn-dailymail`` | article -> highlights              | hub ``cnn_dailymail``    | rougeL   |
| ``webnlg``        | DBpedia triples -> text            | hub ``web_nlg`` (2017)   | bleu     |
| ``coqa``          | story + turns + question -> answer | hub ``stanfordnlp/coqa`` | token_f1 |

``bbc-headline``'s data are :func:`adaptlab.data.load_headlines`: k articles per topic for
training and dev (``shots``, ``data_seed``, ``kshot_mode``) and the fixed test set
(``test_limit``). The hub tasks (:mod:`adaptlab.data.nlg_hub`, spec §4) train on their whole
training split and need the hub, or its cached copy: without it they stop with one sentence
naming the dataset before any weights are read. Causal LMs only: an encoder has no way to write
text, so it is refused before any weights are read.

Each task has its :class:`PromptLayout`; below, ``bbc-headline``'s (the others write
``Triples:`` / ``\\nText:``, ``Story:`` / ``\\nA:``, ``Article:`` / ``\\nSummary:``; CoQA keeps the
end of a long source, where its question is). With ``label_smoothing`` ε the answer tokens'
cross-entropy is smoothed (spec §4: 0.1).

Training. The prompt is ``"Article: {body}\\nTitle:"`` with the body cut to its first
``source_max_tokens`` tokens (400 by default), the target is ``" " + title`` cut to
``target_max_tokens`` tokens (130), then EOS. The pieces are tokenised apart and joined, after the
tokenizer's BOS, so training and evaluation see the very same prompt ids. Labels are -100 on the
prompt (and on padding), the title and EOS tokens elsewhere, and the loss is the ``answer_only``
objective: the mean next-token cross-entropy over an example's title + EOS tokens, then the mean
over the batch (:mod:`adaptlab.training.objectives`).

Evaluation. The dev and test prompts are left-padded in batches and continued by
``model.generate`` for at most ``max_new_tokens`` tokens (40), stopping at EOS, greedily by
default: greedy decoding gives the same titles on every run and at every resume, which is what a
dev metric that picks the best step needs. ``decoding=top_p`` samples with nucleus ``top_p``
(0.9) instead, seeded by the run's ``seed`` without touching the training randomness. The
prediction is the first line of the decoded continuation (a title is one line); predictions are
scored by :func:`adaptlab.training.metrics.generation_scores` (``rouge1``, ``rouge2``, ``rougeL``
F-measure with stemming, corpus ``bleu``) and come back under ``predictions`` for the recipe to
keep (:func:`keep_predictions`: one JSONL of guid, reference and prediction per evaluation).

Example (the tiny tokenizer; the title and EOS carry the labels)::

    >>> from adaptlab.models.tiny import tiny_tokenizer
    >>> tok = tiny_tokenizer()
    >>> item = encode_headline("g", "A long story.", "Short title", tok, 400, 130)
    >>> tok.decode([t for t in item["labels"] if t != -100])
    ' Short title</s>'
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any, Literal

import torch
from accelerate.utils import gather_object
from tqdm.auto import tqdm
from transformers import GenerationConfig

from adaptlab.data import load_headlines
from adaptlab.data.nlg_hub import load_hub_generation
from adaptlab.extract.points import unwrap
from adaptlab.extract.runner import pad_batch
from adaptlab.io import write_jsonl
from adaptlab.training.answer_only import _leading_special_ids, collate_answer_only
from adaptlab.training.data import Data
from adaptlab.training.fewshot import model_kind
from adaptlab.training.metrics import ROUGE_KEYS, generation_scores
from adaptlab.training.objectives import IGNORE_INDEX, OBJECTIVES
from adaptlab.training.optim import TrainingError

LIMITS = ("source_max_tokens", "target_max_tokens", "max_new_tokens")
FLAGS = ("from_linearhead", "l2_loss", "weighted_loss", "packing")
"""Classification and MMLU switches that a generation task refuses when they are on."""


@dataclass(frozen=True)
class PromptLayout:
    """How a source becomes a prompt: ``BOS + source_label + " " + source + target_label``.

    Attributes:
        source_label: written before the source.
        target_label: written after it; the model continues from here.
        keep: which end of a long source is kept: ``start`` (an article) or ``end`` (CoQA,
            whose question comes last).
    """

    source_label: str = "Article:"
    target_label: str = "\nTitle:"
    keep: Literal["start", "end"] = "start"


@dataclass(frozen=True)
class GenerationTask:
    """A text-to-text task: ``load(k, seed, mode, test_limit)`` gives splits whose examples
    carry ``guid``, ``prompt`` (the source text), ``target`` and, when a prediction is scored
    against several texts, ``references``.

    Attributes:
        name: what ``--task`` says.
        load: the task's loader.
        about: one line for the run record.
        layout: the prompt around the source.
        answer_f1: also score the SQuAD-style token F1 (``token_f1``, CoQA's metric).
        best_metric: the default model-selection metric.
        kshot: the task samples k examples per label (``shots``, ``kshot_mode``); the hub
            tasks train on their whole training split instead.
    """

    name: str
    load: Callable[..., Any]
    about: str
    layout: PromptLayout = PromptLayout()
    answer_f1: bool = False
    best_metric: str = "rougeL"
    kshot: bool = False

    @property
    def metrics(self) -> frozenset[str]:
        """The metrics this task's evaluations report."""
        return frozenset({*ROUGE_KEYS, "bleu", *(["token_f1"] if self.answer_f1 else [])})


GENERATION_TASKS: dict[str, GenerationTask] = {
    "bbc-headline": GenerationTask(
        "bbc-headline", load_headlines, "the title of a BBC News story from its body", kshot=True
    ),
    "cnn-dailymail": GenerationTask(
        "cnn-dailymail",
        partial(load_hub_generation, "cnn-dailymail"),
        "the highlights of a CNN / Daily Mail news article (cnn_dailymail 3.0.0)",
        PromptLayout("Article:", "\nSummary:"),
    ),
    "webnlg": GenerationTask(
        "webnlg",
        partial(load_hub_generation, "webnlg"),
        "a text verbalising DBpedia triples (WebNLG 2017: web_nlg webnlg_challenge_2017)",
        PromptLayout("Triples:", "\nText:"),
        best_metric="bleu",
    ),
    "coqa": GenerationTask(
        "coqa",
        partial(load_hub_generation, "coqa"),
        "the answer to a question on a story after the conversation so far (stanfordnlp/coqa)",
        PromptLayout("Story:", "\nA:", keep="end"),
        answer_f1=True,
        best_metric="token_f1",
    ),
}
"""Generation tasks ``--task`` may name (the few-shot classification tasks are in
``adaptlab.data.TASKS``); the hub ones are :data:`adaptlab.data.nlg_hub.HUB_GENERATION`."""


def encode_prompt(
    source: str, tokenizer: Any, source_max_tokens: int, layout: PromptLayout = PromptLayout()
) -> tuple[list[int], int]:
    """``BOS + source_label + " " + source (source_max_tokens tokens) + target_label``; a long
    source keeps its first tokens, or its last with ``layout.keep == "end"``.

    Returns:
        ``([P] prompt ids, number of source tokens cut)``.
    """
    head, body, tail = (
        tokenizer(text, add_special_tokens=False)["input_ids"]
        for text in (layout.source_label, " " + source, layout.target_label)
    )
    cut = max(0, len(body) - source_max_tokens)
    kept = body[cut:] if layout.keep == "end" else body[:source_max_tokens]
    prompt = _leading_special_ids(tokenizer) + list(head) + list(kept)
    return prompt + list(tail), cut


def encode_headline(
    guid: str,
    source: str,
    target: str,
    tokenizer: Any,
    source_max_tokens: int,
    target_max_tokens: int,
    layout: PromptLayout = PromptLayout(),
) -> dict[str, Any]:
    """One training item: prompt then target + EOS, labels on the target and EOS only.

    Returns:
        ``guid``, ``input_ids`` ``[P + T + 1]``, ``labels`` ``[P + T + 1]`` (-100 on the P prompt
        positions), ``weight`` 1.0 and ``n_truncated`` (source tokens cut), the item that
        :func:`adaptlab.training.objectives.collate_answer_only` batches.

    Raises:
        TrainingError: the tokenizer has no EOS token.
    """
    if tokenizer.eos_token_id is None:
        raise TrainingError(
            f"The tokenizer of {getattr(tokenizer, 'name_or_path', 'this model')} has no EOS "
            "token to end a target with; use a model whose tokenizer defines one."
        )
    prompt, cut = encode_prompt(source, tokenizer, source_max_tokens, layout)
    answer = tokenizer(" " + target, add_special_tokens=False)["input_ids"][:target_max_tokens]
    answer = [*answer, tokenizer.eos_token_id]
    return {
        "guid": guid,
        "input_ids": prompt + answer,
        "labels": [IGNORE_INDEX] * len(prompt) + answer,
        "weight": 1.0,
        "n_truncated": cut,
    }


@dataclass(frozen=True)
class Decoding:
    """How titles are generated: ``greedy`` (the default, reproducible) or ``top_p`` sampling."""

    strategy: str = "greedy"
    top_p: float = 0.9
    max_new_tokens: int = 40
    seed: int = 0

    def config(self, tokenizer: Any) -> GenerationConfig:
        """A full generation config, so the model's own defaults (temperature, top-k) never
        change the decoding."""
        sampling = {"do_sample": True, "top_p": self.top_p, "top_k": 0, "temperature": 1.0}
        return GenerationConfig(
            max_new_tokens=self.max_new_tokens,
            num_beams=1,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            **(sampling if self.strategy == "top_p" else {"do_sample": False}),
        )


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    tokenizer: Any,
    accelerator: Any,
    decoding: Decoding,
    batch_size: int,
    progress: bool = False,
) -> list[str]:
    """Continue every prompt and return the first line of each continuation.

    Prompts are sorted by length and dealt round-robin to the processes; every process runs the
    same number of batches (short ones repeat a prompt, dropped after the gather) and, with
    several processes, ``generate`` runs in lock-step (``synced_gpus``) so sharded weights
    (FSDP, ZeRO-3) are gathered by all ranks at every token.

    Args:
        model: the (possibly wrapped) causal LM; put back in its previous train/eval mode.
        prompts: ``[N]`` prompt token ids (:func:`encode_prompt`).
        tokenizer: pads (its pad id), stops (its EOS) and decodes.
        accelerator: the run's ``accelerate.Accelerator``.
        decoding: greedy or top-p, and the length limit.
        batch_size: prompts per ``generate`` call per process.
        progress: show a progress bar of this process's prompts.

    Returns:
        ``[N]`` predictions in prompt order, stripped.
    """
    if not prompts:
        raise TrainingError("The evaluation set is empty; check the split's options.")
    was_training = model.training
    model.eval()
    rank, world, device = accelerator.process_index, accelerator.num_processes, accelerator.device
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    mine = order[rank::world]
    per_rank = math.ceil(len(prompts) / world)
    n_real = len(mine)
    mine += [order[0]] * (per_rank - n_real)
    config = decoding.config(tokenizer)
    texts: list[tuple[int, str]] = []
    bar = tqdm(total=per_rank, desc="generate", unit="prompt", disable=not progress, leave=False)
    # sampling draws from its own seeded generator state: training's randomness stays as it was
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(decoding.seed + rank)
        for start in range(0, per_rank, batch_size):
            chunk = mine[start : start + batch_size]
            ids, mask, _ = pad_batch(
                [prompts[i] for i in chunk], tokenizer.pad_token_id, "left", device
            )
            out = unwrap(model).generate(
                input_ids=ids,
                attention_mask=mask,
                generation_config=config,
                synced_gpus=world > 1,
            )
            decoded = tokenizer.batch_decode(out[:, ids.shape[1] :], skip_special_tokens=True)
            texts += [
                (i, text.strip().split("\n")[0].strip())
                for j, (i, text) in enumerate(zip(chunk, decoded, strict=True))
                if start + j < n_real
            ]
            bar.update(len(chunk))
    bar.close()
    model.train(was_training)
    gathered = dict(gather_object(texts) if world > 1 else texts)
    return [gathered[i] for i in range(len(prompts))]


def split_scores(
    examples: Sequence[Any],
    prompts: Sequence[Sequence[int]],
    tokenizer: Any,
    decoding: Decoding,
    batch_size: int,
    progress: bool,
    model: torch.nn.Module,
    accelerator: Any,
    answer_f1: bool = False,
) -> dict[str, Any]:
    """Generate for one split and score it against each example's ``references`` (all of
    them: multi-reference BLEU), or its ``target`` when it has none.

    Returns:
        ``rouge1``, ``rouge2``, ``rougeL``, ``bleu`` (``token_f1`` with ``answer_f1``), ``n``,
        and ``predictions``: ``[N]`` records of guid, reference (the target), prediction and,
        for several, all ``references`` (:func:`keep_predictions` takes them out).
    """
    show = progress and accelerator.is_main_process
    predicted = generate(model, prompts, tokenizer, accelerator, decoding, batch_size, show)
    references = [getattr(ex, "references", None) or ex.target for ex in examples]
    return {
        **generation_scores(predicted, references, answer_f1=answer_f1),
        "n": len(examples),
        "predictions": [
            {"guid": ex.guid, "reference": ex.target, "prediction": text}
            | ({"references": list(refs)} if isinstance(refs, tuple) and len(refs) > 1 else {})
            for ex, refs, text in zip(examples, references, predicted, strict=True)
        ],
    }


def keep_predictions(metrics: dict[str, Any], path: Path, write: bool) -> dict[str, Any]:
    """Take the per-example ``predictions`` out of ``metrics`` (a generation task's texts, a
    classification test split's logits) and write them to ``path`` (one JSON record per line,
    atomically) when ``write``; other metrics pass unchanged.

    Returns:
        The metrics without ``predictions``.
    """
    records = metrics.pop("predictions", None)
    if records is not None and write:
        write_jsonl(path, records)
    return metrics


def generation_conflicts(cfg: Any) -> list[tuple[bool, str, str]]:
    """The options of ``cfg`` (a ``FinetuneConfig`` whose ``task`` is a generation task) the
    task cannot take, as ``(wrong, option, fix)`` rows for the config's one-sentence error.

    Raises:
        TrainingError: a length limit below 1 or ``top_p`` outside (0, 1].
    """
    limits = {name: getattr(cfg, name) for name in LIMITS}
    low = [f"{name}={value}" for name, value in limits.items() if value < 1]
    if low:
        raise TrainingError(f"{', '.join(low)} must be at least 1 (a count of tokens).")
    if not 0 < cfg.top_p <= 1:
        raise TrainingError(f"top_p={cfg.top_p} is outside (0, 1]; the spec's is 0.9.")
    task = GENERATION_TASKS[cfg.task]
    metrics = task.metrics
    choices = ", ".join(sorted(metrics))
    return [
        (cfg.objective != "answer_only", f"objective={cfg.objective!r}", "answer_only"),
        (cfg.best_metric not in metrics, f"best_metric={cfg.best_metric!r}", f"one of {choices}"),
        (cfg.head != "prompt", f"head={cfg.head!r}", "head=prompt"),
        (cfg.scoring != "label_words", f"scoring={cfg.scoring!r}", "scoring=label_words"),
        *((getattr(cfg, flag), f"{flag}=true", "") for flag in FLAGS),
        (cfg.template is not None, "template", ""),
        (cfg.label_words is not None, "label_words", ""),
        (cfg.shots < 1, f"shots={cfg.shots}", ""),
        (
            not task.kshot and cfg.kshot_mode != "k-shot",
            f"kshot_mode={cfg.kshot_mode!r}",
            "kshot_mode=k-shot (it trains on the whole training split)",
        ),
        (
            getattr(cfg, "ivon_infer_mc_samples", 0) > 0,
            f"ivon_infer_mc_samples={getattr(cfg, 'ivon_infer_mc_samples', 0)}",
            "ivon_infer_mc_samples=0 (titles are generated at IVON's mean: averaging logits "
            "over draws would mix them in the key/value cache)",
        ),
    ]


def check_causal(task: str, model: str, config: Any) -> None:
    """Refuse a model that cannot generate text, before its weights are read.

    Raises:
        TrainingError: the model is not a causal LM.
    """
    kind = model_kind(config) if getattr(config, "architectures", None) else None
    if kind != "causal":
        architectures = ", ".join(getattr(config, "architectures", None) or ["(none)"])
        raise TrainingError(
            f"{task} is a generation task and needs a causal LM; {model} is {architectures}, "
            "so pick a …ForCausalLM model such as embedded:smollm2-135m."
        )


def generation_data(cfg: Any, tokenizer: Any, config: Any) -> Data:
    """A generation task's k-shot train / dev split and test set, encoded for a causal LM.

    Args:
        cfg: the run's ``FinetuneConfig`` (``task`` a key of :data:`GENERATION_TASKS`).
        tokenizer: the model's tokenizer.
        config: the model's config (refused unless it is a causal LM).

    Raises:
        TrainingError: an encoder model, or a tokenizer without EOS.
        DataError: bad split options.
    """
    check_causal(cfg.task, cfg.model, config)
    task = GENERATION_TASKS[cfg.task]
    splits = task.load(
        k=cfg.shots, seed=cfg.data_seed, mode=cfg.kshot_mode, test_limit=cfg.test_limit
    )
    limits, layout = (cfg.source_max_tokens, cfg.target_max_tokens), task.layout
    items = [
        encode_headline(ex.guid, ex.prompt, ex.target, tokenizer, *limits, layout)
        for ex in tqdm(splits.train, desc="encode", unit="example", disable=not cfg.progress)
    ]
    prompts = {
        split: [encode_prompt(ex.prompt, tokenizer, cfg.source_max_tokens, layout)[0]
                for ex in examples]
        for split, examples in (("dev", splits.dev), ("test", splits.test))
    }  # fmt: skip
    decoding = Decoding(cfg.decoding, cfg.top_p, cfg.max_new_tokens, cfg.seed)
    scores = partial(split_scores, tokenizer=tokenizer, decoding=decoding,
                     batch_size=cfg.eval_batch_size, progress=cfg.progress,
                     answer_f1=task.answer_f1)  # fmt: skip
    record = {
        **splits.provenance,
        "task": task.name,
        "about": task.about,
        "prompt": f"{layout.source_label} {{source}}{layout.target_label}",
        "source_kept": layout.keep,
        "label_smoothing": cfg.label_smoothing,
        "source_max_tokens": cfg.source_max_tokens,
        "target_max_tokens": cfg.target_max_tokens,
        "sources_truncated": sum(item["n_truncated"] > 0 for item in items),
        "decoding": asdict(decoding),
    }
    return Data(
        train_items=items,
        collate=collate_answer_only,
        evaluate=lambda model, acc: scores(
            splits.dev, prompts["dev"], model=model, accelerator=acc
        ),
        test=lambda model, acc: scores(splits.test, prompts["test"], model=model, accelerator=acc),
        objective=partial(OBJECTIVES["answer_only"], label_smoothing=cfg.label_smoothing),
        identity={"rows": {"train": [ex.guid for ex in splits.train]}, "dataset": record},
        record=record,
        summary=(
            f"{task.name} {cfg.shots}-shot (seed {cfg.data_seed}): {len(items)} training / "
            f"{len(splits.dev)} dev / {len(splits.test)} test articles"
        ),
    )
