"""Non-neural floors reported beside the zoo models (a model below them learned nothing worth pruning)."""

from __future__ import annotations

from uncurl_hf.evaluation.tasks import get_task


def tfidf_logreg_score(task_name: str, split: str = "test") -> float:
    """Accuracy of TF-IDF (1-2 grams, sublinear tf) + logistic regression (C=3) trained on the train split."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    task = get_task(task_name)
    train, evalset = task.load_split("train"), task.load_split(split)
    vec = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True)
    x_train = vec.fit_transform([e.source for e in train])
    clf = LogisticRegression(C=3.0, max_iter=2000).fit(x_train, [e.target for e in train])
    return float(clf.score(vec.transform([e.source for e in evalset]), [e.target for e in evalset]))
