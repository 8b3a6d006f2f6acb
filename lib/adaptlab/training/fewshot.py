"""Prompt-based few-shot fine-tuning on LM-BFF tasks (kernel.md §4, §10).

The fine-tuning the eNTK predicts: a pretrained LM trained on k examples per label with the
label-word loss, i.e. cross-entropy over the C label-word logits at the mask position (masked
LMs) or at the last prompt token (causal LMs). ``scripts/finetune.py`` takes this path when
``task`` names a few-shot task::

    data = prepare_fewshot("mmlu-topics-2", tokenizer, "causal", k=16, seed=13)
    batch = collate_label_words(data.train[:4], tokenizer.pad_token_id, data.label_word_ids)
    out = OBJECTIVES["label_words"](model, batch)
    metrics = evaluate_classification(model, data.dev, data, accelerator, batch_size=16,
                                      pad_token_id=tokenizer.pad_token_id)

Causal LMs can score whole options instead (``scoring="options"``): class c's score is
log p(" " + word_c | prompt), summed over the option's tokens, so label words may be several
tokens and options sharing a first token stay apart. :func:`scoring_parts` gives the objective
and collate function a prepared task needs, whichever its scoring::

    data = prepare_fewshot("trec", tokenizer, "causal", data_dir="data", scoring="options",
                           label_words={"0": "a description", "1": "an entity", ...})
    objective, collate = scoring_parts(data)
    out = objective(model, collate(data.train[:4], tokenizer.pad_token_id))  # out.scores [4, C]

Evaluation scores every example's C label words (or options): accuracy (argmax over the C
scores), the task's extra metrics (F1 for MRPC/QQP, MCC for CoLA), the macro-F1 over classes,
the expected calibration error of the softmax over the scores and the mean cross-entropy
(``loss``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from tqdm.auto import tqdm

from adaptlab.data import (
    DataError,
    PromptExample,
    Scoring,
    Task,
    TaskSplits,
    check_scoring,
    collate_prompts,
    encode_examples,
    label_word_ids,
    load_task,
    option_ids,
    regression_metrics,
    task_metrics,
)
from adaptlab.extract.points import unwrap
from adaptlab.training.metrics import expected_calibration_error
from adaptlab.training.objectives import (
    IGNORE_INDEX,
    LinearHead,
    Objective,
    label_words_objective,
    options_objective,
)
from adaptlab.training.optim import TrainingError

Kind = Literal["causal", "masked"]


@dataclass
class FewShotData:
    """A few-shot task encoded for one tokenizer.

    Attributes:
        task: the task (template, label words, metrics).
        kind: ``causal`` or ``masked``, how the prompt was built.
        label_word_ids: ``[C]`` vocabulary ids of the label words, in label order; empty with
            ``scoring="options"`` (words may be several tokens there).
        train: ``[N]`` training examples, each with ``weight`` 1.0.
        dev: ``[M_dev]`` development examples (model selection).
        test: ``[M_test]`` test examples.
        record: what was loaded, for result records (task, k, seed, mode, sizes, scoring,
            provenance).
        scoring: ``label_words`` (one token per class at the scored position) or ``options``
            (causal LMs: the sum of the log-probabilities of each class's option tokens).
        option_ids: ``[C]`` token ids of each class's option ``" " + word`` (one list per
            class; single tokens with label-word scoring).
    """

    task: Task
    kind: Kind
    label_word_ids: list[int]
    train: list[dict[str, Any]]
    dev: list[PromptExample]
    test: list[PromptExample]
    record: dict[str, Any] = field(default_factory=dict)
    scoring: Scoring = "label_words"
    option_ids: list[list[int]] = field(default_factory=list)


def model_kind(config: Any, encoder_ok: bool = False) -> Kind:
    """``causal`` or ``masked`` from a model config's architectures.

    Args:
        config: the model's config.
        encoder_ok: a bare encoder (``BertModel``, ``RobertaModel``: no LM head) is accepted
            and builds ``masked`` prompts; for the linear head, which reads the first token's
            hidden state and never the LM head.

    Raises:
        TrainingError: the model is neither a causal nor a masked LM (nor an accepted encoder).
    """
    architectures = getattr(config, "architectures", None) or []
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures):
        return "causal"
    if any(a.endswith("ForMaskedLM") for a in architectures):
        return "masked"
    if encoder_ok and not getattr(config, "is_decoder", False):
        return "masked"
    raise TrainingError(
        f"Model architectures {architectures or '(none)'} have no LM head to score label words; "
        "use a causal LM (…ForCausalLM) or a masked LM (…ForMaskedLM)."
    )


def prepare_fewshot(
    task: str,
    tokenizer: Any,
    kind: Kind,
    *,
    data_dir: str | Path | None = None,
    k: int = 16,
    seed: int = 42,
    mode: str = "k-shot",
    template: str | None = None,
    label_words: Mapping[str, str] | None = None,
    max_length: int | None = None,
    test_limit: int | None = None,
    cache_dir: str | Path | None = None,
    head: Literal["prompt", "linear"] = "prompt",
    scoring: Scoring = "label_words",
) -> FewShotData:
    """Load a task's k-shot split and encode it with the task's (or the given) prompt.

    Args:
        task: a key of ``adaptlab.data.TASKS``.
        tokenizer: the model's tokenizer.
        kind: how prompts are built (see :func:`model_kind`).
        data_dir: the k-shot data root (``scripts/prepare_fewshot.py``); unused by offline tasks.
        k: examples per label in train and dev.
        seed: data seed of the split.
        mode: ``k-shot``, ``k-shot-10x``, ``k-shot-1k-test`` or ``full`` (the original data).
        template: prompt template overriding the task's.
        label_words: label -> word overriding the task's.
        max_length: token limit overriding the task's ``max_seq_length``.
        test_limit: evaluate a seeded sample of this many test examples (None: all).
        cache_dir: cache of encoded examples (keyed by template and label words too).
        head: ``prompt`` (the template) or ``linear`` (no prompt: the sentences alone, scored
            by a linear head at the first (masked) or last (causal) token).
        scoring: ``label_words`` (each word one token) or ``options`` (causal LMs, prompt
            head: each class's whole option ``" " + word`` is scored, any number of tokens);
            :func:`scoring_parts` gives the matching objective and collate function.

    Raises:
        DataError: unknown task, missing data, too few examples, label words that do not fit
            the scoring (multi-token words with ``label_words``, identical options), options
            for a masked LM or a linear head, or a regression task (STS-B) with a prompt head.
    """
    check_scoring(scoring, kind)
    if scoring == "options" and head != "prompt":
        raise DataError(
            f"scoring=options scores a prompt's options, not head={head!r}; use head=prompt."
        )
    splits: TaskSplits = load_task(task, data_dir, k=k, seed=seed, mode=mode, test_limit=test_limit)
    spec = splits.task
    if spec.regression is not None and head != "linear":
        raise DataError(
            f"Task {spec.name} is a regression task, scored by a one-output linear head; use "
            "head=linear (prompt-based regression by label words is not supported)."
        )
    words = dict(label_words) if label_words else None
    options = option_ids(words or spec, tokenizer)
    ids = label_word_ids(words or spec, tokenizer) if scoring == "label_words" else []
    encode = dict(
        task=spec,
        tokenizer=tokenizer,
        kind=kind,
        head=head,
        template=template,
        label_words=words,
        max_length=max_length,
        cache_dir=cache_dir,
        scoring=scoring,
    )
    train = [dict(ex, weight=1.0) for ex in encode_examples(splits.train, **encode)]
    record = {
        "task": spec.name,
        "k": k,
        "seed": seed,
        "mode": mode,
        "head": head,
        "template": (template or spec.template) if head == "prompt" else None,
        "label_words": words or dict(spec.label_words),
        "label_word_ids": ids,
        "scoring": scoring,
        "option_ids": options,
        "n": {"train": len(splits.train), "dev": len(splits.dev), "test": len(splits.test)},
        "provenance": splits.provenance,
    }
    return FewShotData(
        task=spec,
        kind=kind,
        label_word_ids=ids,
        train=train,
        dev=encode_examples(splits.dev, **encode),
        test=encode_examples(splits.test, **encode),
        record=record,
        scoring=scoring,
        option_ids=options,
    )


def collate_label_words(
    items: Sequence[Mapping[str, Any]],
    pad_token_id: int,
    label_word_ids: Sequence[int] | None = None,
) -> dict[str, torch.Tensor]:
    """A right-padded label-word batch with its example weights.

    Args:
        items: ``[B]`` encoded training examples.
        pad_token_id: padding id.
        label_word_ids: ``[C]`` the task's label-word ids; None: each item's own
            ``label_word_ids`` (multi-task runs, :func:`tag_task`).

    Returns:
        ``input_ids`` / ``attention_mask`` ``[B, T]``, ``positions`` / ``class_labels`` ``[B]``,
        ``label_word_ids`` ``[C]`` (or ``[B, C]`` from the items) and ``weights`` ``[B]``
        float32.
    """
    batch = collate_prompts(items, pad_token_id, label_word_ids)
    if label_word_ids is None:
        batch["label_word_ids"] = torch.tensor([ex["label_word_ids"] for ex in items])
    batch["weights"] = torch.tensor([float(ex.get("weight", 1.0)) for ex in items])
    return batch


def collate_options(
    items: Sequence[Mapping[str, Any]],
    pad_token_id: int,
    option_ids: Sequence[Sequence[int]] | None = None,
) -> dict[str, torch.Tensor]:
    """A right-padded options batch: C rows per example, its prompt then each option.

    Row ``b * C + c`` is example b's prompt (up to its scored position, the last prompt token)
    followed by the tokens of option c; ``option_labels`` holds those option tokens where they
    stand and -100 elsewhere, so position t's logits score label t + 1 (see
    :func:`adaptlab.training.objectives.options_objective`). The batch has B x C rows of up to
    prompt + longest option tokens: C times the prompt's tokens of a label-word batch.

    Args:
        items: ``[B]`` encoded examples (causal prompts).
        pad_token_id: padding id.
        option_ids: ``[C]`` token ids of each class's option; None: each item's own
            ``option_ids`` (multi-task runs, :func:`tag_task`).

    Returns:
        ``input_ids`` / ``attention_mask`` / ``option_labels`` ``[B * C, T]`` (long),
        ``class_labels`` ``[B]`` (long) and ``weights`` ``[B]`` float32.

    Raises:
        TrainingError: no items, or items whose numbers of options differ.
    """
    if not items:
        raise TrainingError("collate_options got no examples; pass at least one.")
    per_item = [option_ids if option_ids is not None else ex["option_ids"] for ex in items]
    if len({len(options) for options in per_item}) != 1:
        raise TrainingError("The batch mixes tasks with different numbers of options.")
    rows = [
        (ex["input_ids"][: ex["position"] + 1], list(option))
        for ex, options in zip(items, per_item, strict=True)
        for option in options
    ]
    width = max(len(prompt) + len(option) for prompt, option in rows)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for row, (prompt, option) in enumerate(rows):
        n, m = len(prompt), len(option)
        input_ids[row, : n + m] = torch.tensor(list(prompt) + option, dtype=torch.long)
        labels[row, n : n + m] = torch.tensor(option, dtype=torch.long)
        attention_mask[row, : n + m] = 1
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "option_labels": labels,
        "class_labels": torch.tensor([int(ex["label"]) for ex in items], dtype=torch.long),
        "weights": torch.tensor([float(ex.get("weight", 1.0)) for ex in items]),
    }


def scoring_parts(data: FewShotData) -> tuple[Objective, Callable[..., dict[str, torch.Tensor]]]:
    """The objective and collate function of a prepared task's scoring.

    Returns:
        ``(objective, collate)``: ``objective(model, batch)`` gives the ``[B, C]`` scores and
        losses; ``collate(items, pad_token_id)`` builds its batch from encoded examples
        (``label_words_objective`` with :func:`collate_label_words`, or ``options_objective``
        with :func:`collate_options`).
    """
    if data.scoring == "options":
        return options_objective, partial(collate_options, option_ids=data.option_ids)
    return label_words_objective, partial(collate_label_words, label_word_ids=data.label_word_ids)


def tag_task(data: FewShotData) -> list[dict[str, Any]]:
    """The task's training examples, each carrying the task's name, ``label_word_ids`` ``[C]``
    and ``option_ids``, so that examples of several tasks can share a batch
    (:func:`collate_label_words`, :func:`collate_options`)."""
    tags = dict(task=data.task.name, label_word_ids=data.label_word_ids, option_ids=data.option_ids)
    return [dict(ex, **tags) for ex in data.train]


@torch.no_grad()
def evaluate_classification(
    model: nn.Module,
    examples: Sequence[PromptExample],
    data: FewShotData,
    accelerator: Any,
    batch_size: int,
    pad_token_id: int,
    objective: Objective | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Accuracy, task metrics, ECE and loss of the class scores; every process runs the same
    batches. A regression task (STS-B) reports its score metrics instead of accuracy and ECE.

    Examples are sorted by length and dealt round-robin to the processes (short processes
    repeat one, dropped after the gather).

    Args:
        model: the (possibly wrapped) model; put back in its previous train/eval mode.
        examples: ``[M]`` encoded examples.
        data: the task (metrics, label-word ids).
        accelerator: the run's ``accelerate.Accelerator``.
        batch_size: examples per forward pass per process.
        pad_token_id: padding id.
        objective: gives the ``[B, C]`` scores and per-example losses: the linear head's, or
            the task's scoring objective with the run's loss (CE or MSE); None: the task's
            (:func:`scoring_parts`). Batches are built with the task's collate function.
        progress: show a progress bar of this process's examples (examples/s).

    Returns:
        ``accuracy``, the task's other metrics, ``macro_f1`` (sklearn's ``f1_score`` with
        ``average="macro"``), ``ece`` (of the softmax over the scores),
        ``loss`` (the objective's mean loss), ``n`` and ``logits`` (``[M, C]`` scores in input
        order, as nested lists). Regression: ``pearson``, ``spearman``, ``corr``
        (:func:`~adaptlab.data.regression_metrics` of the predicted scores, ``logits``
        ``[M, 1]``), ``loss`` and ``n``.
    """
    if not examples:
        raise TrainingError("The evaluation set is empty; check the task's dev/test split.")
    default, collate = scoring_parts(data)
    objective = objective or default
    regression = data.task.regression is not None
    was_training = model.training
    model.eval()
    rank, world, device = accelerator.process_index, accelerator.num_processes, accelerator.device
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]["input_ids"]))
    mine = order[rank::world]
    per_rank = math.ceil(len(examples) / world)
    valid = [1.0] * len(mine) + [0.0] * (per_rank - len(mine))
    mine += [order[0]] * (per_rank - len(mine))
    rows = []
    bar = tqdm(total=per_rank, desc="evaluate", unit="ex", dynamic_ncols=True,
               disable=not progress, leave=False)  # fmt: skip
    for start in range(0, per_rank, batch_size):
        chunk = mine[start : start + batch_size]
        bar.update(len(chunk))
        batch = collate([examples[i] for i in chunk], pad_token_id)
        batch = {key: value.to(device) for key, value in batch.items()}
        out = objective(model, batch)
        meta = torch.tensor(
            [[i, v] for i, v in zip(chunk, valid[start : start + batch_size], strict=True)],
            device=device,
            dtype=torch.float64,
        )
        target = batch["target_scores"] if regression else batch["class_labels"]
        columns = [meta, target[:, None].double(), out.per_example[:, None]]
        rows.append(torch.cat([*(c.double() for c in columns), out.scores.double()], 1))
    bar.close()
    table = accelerator.gather(torch.cat(rows)).cpu()
    table = table[table[:, 1] == 1]
    table = table[table[:, 0].argsort()]
    model.train(was_training)

    scores = table[:, 4:]
    if regression:
        metrics = regression_metrics(scores[:, 0].tolist(), table[:, 2].tolist())
        metrics.update(loss=float(table[:, 3].mean()), n=len(table), logits=scores.tolist())
        return metrics
    from sklearn.metrics import f1_score

    labels = table[:, 2].long()
    predictions = scores.argmax(1)
    metrics = task_metrics(data.task, predictions.tolist(), labels.tolist())
    metrics["accuracy"] = metrics.pop("acc", float((predictions == labels).double().mean()))
    # the mean F1 over the classes that occur in the gold or the predicted labels
    metrics["macro_f1"] = float(
        f1_score(labels.tolist(), predictions.tolist(), average="macro", zero_division=0)
    )
    metrics["ece"] = expected_calibration_error(torch.softmax(scores, 1), labels.tolist())
    metrics["loss"] = float(table[:, 3].mean())
    metrics["n"] = len(labels)
    metrics["logits"] = scores.tolist()
    return metrics


def init_linear_head(
    model: nn.Module,
    data: FewShotData,
    pad_token_id: int,
    *,
    from_logistic: bool,
    batch_size: int = 16,
    progress: bool = False,
) -> LinearHead:
    """A new ``LinearHead(H, C)`` for no-prompt fine-tuning, random or fitted
    (``LinearHead(H, 1)`` for a regression task, fitted by least squares).

    Args:
        model: the plain (unsharded) model whose hidden size and features the head reads.
        data: the task encoded with ``head="linear"`` (positions: first/last token).
        pad_token_id: padding id.
        from_logistic: fit it by logistic regression on the training features
            (:func:`fit_linear_head`, upstream ``--from_linearhead``; regression: ordinary
            least squares to the scores, :func:`fit_regression_head`); else ``nn.Linear``'s
            random init from the global RNG.
        batch_size: examples per feature forward pass.
        progress: show a progress bar of the feature pass (examples/s).
    """
    hidden = unwrap(model).config.hidden_size
    regression = data.task.regression is not None
    head = LinearHead(hidden, 1 if regression else len(data.task.labels))
    if from_logistic:
        features = head_features(model, data.train, pad_token_id, batch_size, progress)
        if regression:
            fitted = fit_regression_head(features, [float(ex["score"]) for ex in data.train])
        else:
            labels = [int(ex["label"]) for ex in data.train]
            fitted = fit_linear_head(features, labels, len(data.task.labels))
        head.linear.load_state_dict(fitted.state_dict())
    return head


@torch.no_grad()
def head_features(
    model: nn.Module,
    examples: Sequence[PromptExample],
    pad_token_id: int,
    batch_size: int = 16,
    progress: bool = False,
) -> torch.Tensor:
    """``[N, H]`` last-layer hidden states at each example's position (the head's input)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    rows = []
    bar = tqdm(total=len(examples), desc="head features", unit="ex", dynamic_ncols=True,
               disable=not progress, leave=False)  # fmt: skip
    for start in range(0, len(examples), batch_size):
        batch = collate_prompts(examples[start : start + batch_size], pad_token_id)
        batch = {key: value.to(device) for key, value in batch.items()}
        out = model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            output_hidden_states=True,
        )
        hidden = out.hidden_states[-1]
        index = torch.arange(hidden.shape[0], device=device)
        rows.append(hidden[index, batch["positions"]].double().cpu())
        bar.update(hidden.shape[0])
    bar.close()
    model.train(was_training)
    return torch.cat(rows)


def logistic_regression_cv(folds: int = 5, max_iter: int = 5000) -> Any:
    """``LogisticRegressionCV(max_iter, random_state=0)`` with upstream's defaults pinned.

    scikit-learn 0.24 (upstream's pin) meant 10 Cs, 5-fold stratified CV, L2, lbfgs and
    accuracy as the CV score. Newer releases announce changes of these defaults, so they are
    spelled out (the fit is the same, and no FutureWarning reaches the user).
    """
    import inspect

    from sklearn.linear_model import LogisticRegressionCV

    params = inspect.signature(LogisticRegressionCV).parameters
    kwargs: dict[str, Any] = {"Cs": 10, "cv": folds, "solver": "lbfgs", "scoring": "accuracy"}
    if params["l1_ratios"].default == "warn":  # releases where l1_ratio replaces penalty
        kwargs["l1_ratios"] = (0.0,)
    if "use_legacy_attributes" in params:  # only the fitted attributes change, not the fit
        kwargs["use_legacy_attributes"] = False
    return LogisticRegressionCV(max_iter=max_iter, random_state=0, **kwargs)


def fit_linear_head(features: torch.Tensor, labels: Sequence[int], n_classes: int) -> nn.Linear:
    """A linear head initialised by logistic regression on frozen features (kernel.md §10).

    Upstream's ``LinearHeadTrainer`` (``--from_linearhead``): scikit-learn
    ``LogisticRegressionCV(max_iter=5000)`` on the pretrained features; a binary problem's
    single row (w, b) becomes the two rows (-w/2, -b/2) and (w/2, b/2), which give the same
    probabilities.

    Args:
        features: ``[N, H]`` from :func:`head_features`.
        labels: ``[N]`` class indices.
        n_classes: C.

    Returns:
        ``nn.Linear(H, C)`` in float32 holding the fitted weights.
    """
    x = features.double().numpy()
    y = list(labels)
    if len(set(y)) < 2:
        raise TrainingError("The linear head needs training examples of at least two labels.")
    folds = min(5, min(y.count(c) for c in set(y)))
    clf = logistic_regression_cv(folds=max(folds, 2), max_iter=5000).fit(x, y)
    weight = torch.as_tensor(clf.coef_)
    bias = torch.as_tensor(clf.intercept_)
    if weight.shape[0] == 1:
        weight = torch.cat([-weight / 2, weight / 2])
        bias = torch.cat([-bias / 2, bias / 2])
    if weight.shape[0] != n_classes:
        raise TrainingError(
            f"The training split holds {weight.shape[0]} of the task's {n_classes} labels; "
            "every label needs training examples."
        )
    head = nn.Linear(features.shape[1], n_classes)
    with torch.no_grad():
        head.weight.copy_(weight)
        head.bias.copy_(bias)
    return head


def fit_regression_head(features: torch.Tensor, scores: Sequence[float]) -> nn.Linear:
    """A one-output head fitted by ordinary least squares to the training scores.

    The regression counterpart of :func:`fit_linear_head`: upstream's ``LinearHeadTrainer``
    fits scikit-learn ``LinearRegression`` for a regression task (kernel.md §10), as here.

    Args:
        features: ``[N, H]`` from :func:`head_features`.
        scores: ``[N]`` gold scores (unscaled).

    Returns:
        ``nn.Linear(H, 1)`` in float32 holding the fitted weights.
    """
    from sklearn.linear_model import LinearRegression

    if len(scores) < 2:
        raise TrainingError("The regression head needs at least two training examples to fit.")
    fit = LinearRegression().fit(features.double().numpy(), list(scores))
    head = nn.Linear(features.shape[1], 1)
    with torch.no_grad():
        head.weight.copy_(torch.as_tensor(fit.coef_)[None])
        head.bias.fill_(float(fit.intercept_))
    return head
