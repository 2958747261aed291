"""A judge of emotion and dialogue act: what `eval --control` and every conditioned run measure replies with.

    python -m gpt2ft eval --model gpt2_finetuned --control 50     # uses gpt2_finetuned/judge/, saved by train

Two text classifiers, one per label field, trained on DailyDialog's training turns only (never a held-out turn):
word and word-pair TF-IDF features and a logistic regression with balanced class weights, from scikit-learn. Balanced,
because 82% of DailyDialog's turns carry no emotion: a judge fitted to that mix would call almost every reply "no
emotion" and could not tell whether a reply asked to be happy is. Its own accuracy and macro-F1 per label on the test
turns are measured and saved with it, so a reader knows how far to trust a control accuracy it reports.

Saved as JSON (vocabulary, classes, settings, its scores) and safetensors (idf, weights): no pickle, so a judge from
a downloaded model folder loads as safely as the model.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load_file, save_file
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import f1_score

from .conversations import LABELS
from .errors import ModelError

JUDGE_DIR = "judge"
# Word and word-pair features of lower-cased text; pairs seen at least twice. sublinear_tf: a word said twice is not
# twice the evidence. C=4: a little less regularisation than the default, measured on DailyDialog's validation turns.
VECTORIZER = {"ngram_range": (1, 2), "min_df": 2, "max_features": 50_000, "sublinear_tf": True, "lowercase": True}
REGULARISATION = 4.0


@dataclass
class Classifier:
    """One field's classifier: its TF-IDF features and the logistic regression over them."""

    vectorizer: TfidfVectorizer
    model: LogisticRegression

    @property
    def classes(self) -> list[str]:
        return [str(label) for label in self.model.classes_]

    def predict(self, texts: Sequence[str]) -> list[str]:
        if not texts:
            return []
        return [str(label) for label in self.model.predict(self.vectorizer.transform(list(texts)))]


@dataclass
class Judge:
    """The classifiers of each label field, and how well each did on held-out turns (`scores`)."""

    classifiers: dict[str, Classifier]
    scores: dict[str, Any] = field(default_factory=dict)

    def predict(self, field_name: str, texts: Sequence[str]) -> list[str]:
        return self.classifiers[field_name].predict(texts)


def labelled_turns(dialogs: Any, field_name: str) -> tuple[list[str], list[str]]:
    """(texts, labels) of every turn of a prepared split that carries a `field_name` label."""
    texts, labels = [], []
    for messages in dialogs["messages"]:
        for message in messages:
            if message.get(field_name):
                texts.append(message["content"])
                labels.append(message[field_name])
    return texts, labels


def fit_judge(train: Any, fields: Iterable[str] = tuple(LABELS), test: Any = None) -> Judge:
    """The judge of `fields`, fitted on the labelled turns of `train` (DailyDialog's training split), and scored on
    `test`'s (its test split) when given.

    Raises:
        ModelError: a field has no labelled training turn, or a single label.
    """
    classifiers = {}
    for name in fields:
        texts, labels = labelled_turns(train, name)
        if len(set(labels)) < 2:
            raise ModelError(f"the judge of {name}: the training turns carry {len(set(labels))} {name} label(s)")
        vectorizer = TfidfVectorizer(**VECTORIZER)
        features = vectorizer.fit_transform(texts)
        model = LogisticRegression(C=REGULARISATION, class_weight="balanced", max_iter=2000)
        model.fit(features, labels)
        classifiers[name] = Classifier(vectorizer, model)
    judge = Judge(classifiers)
    if test is not None:
        judge.scores = score_judge(judge, test)
    return judge


def score_judge(judge: Judge, dialogs: Any) -> dict[str, Any]:
    """The judge on a split's labelled turns: accuracy, macro-F1 and F1 per label, per field."""
    scores = {}
    for name, classifier in judge.classifiers.items():
        texts, labels = labelled_turns(dialogs, name)
        predicted = classifier.predict(texts)
        classes = [label for label in LABELS[name] if label in classifier.classes]
        per_label = f1_score(labels, predicted, labels=classes, average=None, zero_division=0)
        scores[name] = {
            "turns": len(texts),
            "accuracy": float(np.mean([p == t for p, t in zip(predicted, labels)])) if texts else None,
            "macro_f1": float(np.mean(per_label)) if texts else None,
            "f1": {label: round(float(value), 4) for label, value in zip(classes, per_label)},
        }
    return scores


def save_judge(judge: Judge, folder: str | Path) -> Path:
    """Write the judge as judge.json and judge.safetensors in `folder`; returns the folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    arrays, described = {}, {}
    for name, classifier in judge.classifiers.items():
        # C order: safetensors writes an array's memory as it is, and a fitted coef_ may be Fortran-ordered.
        arrays[f"{name}.idf"] = np.ascontiguousarray(classifier.vectorizer.idf_, dtype=np.float64)
        arrays[f"{name}.coef"] = np.ascontiguousarray(classifier.model.coef_, dtype=np.float64)
        arrays[f"{name}.intercept"] = np.ascontiguousarray(classifier.model.intercept_, dtype=np.float64)
        vocabulary = classifier.vectorizer.vocabulary_
        described[name] = {
            "classes": classifier.classes,
            "vocabulary": sorted(vocabulary, key=vocabulary.get),  # the feature order
        }
    save_file(arrays, str(folder / "judge.safetensors"))
    payload = {"vectorizer": VECTORIZER, "fields": described, "scores": judge.scores}
    (folder / "judge.json").write_text(json.dumps(payload, indent=1), encoding="utf-8")
    return folder


def judge_for(model_dir: str | Path, training_dialogs: Any) -> Judge:
    """The judge saved with a model (`<model>/judge/`, written by a conditioned `train`), or, for a folder without
    one, a judge fitted on `training_dialogs()` (the training split of the data the model was trained on)."""
    folder = Path(model_dir) / JUDGE_DIR
    if (folder / "judge.json").is_file():
        return load_judge(folder)
    return fit_judge(training_dialogs())


def load_judge(folder: str | Path) -> Judge:
    """A judge saved by save_judge, rebuilt from its JSON and safetensors (nothing is unpickled).

    Raises:
        ModelError: no judge there, or an unreadable one.
    """
    folder = Path(folder)
    try:
        payload = json.loads((folder / "judge.json").read_text(encoding="utf-8"))
        arrays = load_file(str(folder / "judge.safetensors"))
    except (OSError, ValueError) as error:
        raise ModelError(f"{folder}: no readable judge ({type(error).__name__}: {error})") from None
    settings = {**payload["vectorizer"], "ngram_range": tuple(payload["vectorizer"]["ngram_range"])}
    classifiers = {}
    for name, described in payload["fields"].items():
        vectorizer = TfidfVectorizer(**settings, vocabulary={word: i for i, word in enumerate(described["vocabulary"])})
        vectorizer.idf_ = arrays[f"{name}.idf"]
        model = LogisticRegression()
        model.classes_ = np.array(described["classes"])
        model.coef_ = arrays[f"{name}.coef"]
        model.intercept_ = arrays[f"{name}.intercept"]
        classifiers[name] = Classifier(vectorizer, model)
    return Judge(classifiers, payload.get("scores", {}))
