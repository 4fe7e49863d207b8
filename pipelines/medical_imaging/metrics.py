"""Classification metrics (AUC, accuracy, ECE), temperature scaling and the evaluation plots."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from sklearn.metrics import roc_auc_score, roc_curve  # noqa: E402


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = logits / temperature
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def auc_score(probs: np.ndarray, labels: np.ndarray) -> float:
    """Binary: AUC of the positive class; multi-class: macro one-vs-rest (as MedMNIST reports)."""
    if probs.shape[1] == 2:
        return float(roc_auc_score(labels, probs[:, 1]))
    return float(roc_auc_score(labels, probs, multi_class="ovr", average="macro"))


def ece_score(probs: np.ndarray, labels: np.ndarray, n_bins: int = 15) -> float:
    """Expected calibration error of the top-class confidence (equal-width bins)."""
    conf = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == labels).astype(float)
    edges = np.linspace(0, 1, n_bins + 1)
    ece = 0.0
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        mask = (conf > lo) & (conf <= hi)
        if mask.any():
            ece += mask.mean() * abs(correct[mask].mean() - conf[mask].mean())
    return float(ece)


def classification_metrics(probs: np.ndarray, labels: np.ndarray, threshold: float = 0.5) -> dict[str, float]:
    """auc, acc (binary: at ``threshold`` on the positive class), ece, nll, sensitivity, specificity."""
    if probs.shape[1] == 2:
        pred = (probs[:, 1] >= threshold).astype(int)
    else:
        pred = probs.argmax(axis=1)
    out = {
        "auc": auc_score(probs, labels),
        "acc": float((pred == labels).mean()),
        "ece": ece_score(probs, labels),
        "nll": float(-np.log(np.clip(probs[np.arange(len(labels)), labels], 1e-12, 1)).mean()),
        "n": int(len(labels)),
    }
    if probs.shape[1] == 2:
        pos, neg = labels == 1, labels == 0
        out["sensitivity"] = float((pred[pos] == 1).mean()) if pos.any() else float("nan")
        out["specificity"] = float((pred[neg] == 0).mean()) if neg.any() else float("nan")
    return out


def review_flag_metrics(
    samples: list[np.ndarray], labels: np.ndarray, threshold: float, max_entropy: float, max_std: float
) -> dict[str, float | int | None]:
    """How well the service's "needs radiologist review" flag picks out its own errors.

    ``samples``: per study the (S, classes) sampled probabilities (``served_samples``); the decision and the
    flag follow the service (``uncertainty_review_reasons`` at the given limits). ``error_capture`` is the
    share of wrong decisions that carry the flag; ``acc_unflagged`` the accuracy of the studies that do not.
    """
    from services.medical_imaging.app.uncertainty import decide, uncertainty_review_reasons

    flagged, correct, positive = [], [], []
    for probs, label in zip(samples, labels, strict=True):
        binary = probs.shape[1] == 2
        predicted, unc = decide(probs, threshold)
        flagged.append(bool(uncertainty_review_reasons(unc, threshold, binary, max_entropy, max_std)))
        correct.append(predicted == int(label))
        positive.append(binary and int(label) == 1)
    f, c, pos = np.array(flagged), np.array(correct), np.array(positive)
    errors, missed = ~c, ~c & pos

    def share(mask: np.ndarray, within: np.ndarray) -> float | None:
        return float(mask[within].mean()) if within.any() else None

    return {
        "flagged_rate": float(f.mean()),
        "errors": int(errors.sum()),
        "errors_flagged": int((errors & f).sum()),
        "error_capture": share(f, errors),
        "acc_unflagged": share(c, ~f),
        "acc_flagged": share(c, f),
        "missed_positives": int(missed.sum()),
        "missed_positives_flagged": int((missed & f).sum()),
    }


def fit_temperature(logits: np.ndarray, labels: np.ndarray, steps: int = 200) -> float:
    """Temperature scaling on held-out logits (minimises NLL with LBFGS over log T)."""
    z = torch.as_tensor(logits, dtype=torch.float64)
    y = torch.as_tensor(labels, dtype=torch.long)
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.1, max_iter=steps)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(z / log_t.exp(), y)
        loss.backward()
        return loss

    opt.step(closure)
    return float(np.clip(log_t.exp().item(), 0.05, 20.0))


def plot_roc(probs: np.ndarray, labels: np.ndarray, path: Path, title: str) -> None:
    """ROC curve PNG (positive class for binary, one curve per class otherwise)."""
    fig, ax = plt.subplots(figsize=(5, 5))
    classes = [1] if probs.shape[1] == 2 else list(range(probs.shape[1]))
    for c in classes:
        fpr, tpr, _ = roc_curve(labels == c, probs[:, c])
        ax.plot(fpr, tpr, label=f"class {c} (AUC {roc_auc_score(labels == c, probs[:, c]):.3f})")
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(title)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_reliability(probs: np.ndarray, labels: np.ndarray, path: Path, title: str, n_bins: int = 10) -> None:
    """Reliability diagram (top-class confidence vs accuracy per bin) PNG."""
    conf = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == labels).astype(float)
    edges = np.linspace(0, 1, n_bins + 1)
    centers, accs, counts = [], [], []
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        mask = (conf > lo) & (conf <= hi)
        centers.append((lo + hi) / 2)
        accs.append(correct[mask].mean() if mask.any() else 0.0)
        counts.append(int(mask.sum()))
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.bar(centers, accs, width=1 / n_bins, edgecolor="k", alpha=0.7, label="accuracy")
    ax.plot([0, 1], [0, 1], "r--", label="perfect calibration")
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    ax.set_title(f"{title}\nECE {ece_score(probs, labels):.3f}")
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
