"""The built-in datasets: ``digits`` and ``clusters`` (scikit-learn), ``markov`` (a second-order token chain).

Stage: data (below calibrate / compare / bench). Input: a built-in name. Output: (samples, labels, metadata) as
numpy arrays, cached per process; ``edgegate.data.load_data`` turns them into a `Dataset` with its splits.
Torch-free (numpy; scikit-learn only to build ``digits``/``clusters``) so the runtime side can use it.
"""

from __future__ import annotations

from functools import cache

import numpy as np

from edgegate.errors import DataError

# Built-in generators are fixed (not user seeds) so every run and every machine sees the same data.
MARKOV_VOCAB, MARKOV_CONTEXT, MARKOV_CHAINS, MARKOV_STEPS, MARKOV_ALPHA = 16, 8, 64, 1000, 0.12
CLUSTERS_KW = {"n_samples": 4000, "n_features": 16, "n_informative": 8, "n_redundant": 2,
               "n_classes": 4, "n_clusters_per_class": 3, "class_sep": 2.0, "flip_y": 0.0,
               "random_state": 7}



def _sklearn():
    try:
        import sklearn.datasets
    except ImportError as e:
        raise DataError("built-in datasets digits/clusters need scikit-learn: "
                        "pip install 'edgegate[compile]'") from e
    return sklearn.datasets


@cache
def _digits() -> tuple[np.ndarray, np.ndarray, dict]:
    d = _sklearn().load_digits()
    x = (d.data / 16.0).astype(np.float32)  # pixel values 0..16 -> [0, 1]
    return x, d.target.astype(np.int64), {"n_classes": 10, "image_shape": [8, 8]}


@cache
def _clusters() -> tuple[np.ndarray, np.ndarray, dict]:
    # Several clusters per class at moderate separation: most points are easy (an early head is
    # confident), points near class borders need the deeper stages -- the regime where exits pay.
    x, y = _sklearn().make_classification(**CLUSTERS_KW)
    x = (x - x.mean(0)) / x.std(0)
    return x.astype(np.float32), y.astype(np.int64), {"n_classes": CLUSTERS_KW["n_classes"]}


def markov_transitions(vocab: int = MARKOV_VOCAB, alpha: float = MARKOV_ALPHA,
                       seed: int = 1234) -> np.ndarray:
    """P[a, b, c] = P(next = c | previous two tokens a, b): sparse-ish Dirichlet rows."""
    rng = np.random.default_rng(seed)
    return rng.dirichlet(np.full(vocab, alpha), size=(vocab, vocab))


@cache
def _markov() -> tuple[np.ndarray, np.ndarray, dict]:
    p = markov_transitions()
    cdf = np.cumsum(p, axis=-1)
    rng = np.random.default_rng(4321)
    # Independent chains sampled in parallel (one numpy step per position, vectorized over chains).
    seq = np.empty((MARKOV_CHAINS, MARKOV_STEPS), dtype=np.int64)
    seq[:, :2] = rng.integers(0, MARKOV_VOCAB, size=(MARKOV_CHAINS, 2))
    for t in range(2, MARKOV_STEPS):
        u = rng.random(MARKOV_CHAINS)[:, None]
        seq[:, t] = np.minimum((u > cdf[seq[:, t - 2], seq[:, t - 1]]).sum(-1), MARKOV_VOCAB - 1)
    n_win = MARKOV_STEPS - MARKOV_CONTEXT
    idx = np.arange(n_win)[:, None] + np.arange(MARKOV_CONTEXT)[None, :]
    x = seq[:, idx].reshape(-1, MARKOV_CONTEXT)  # [chains * n_win, ctx], chain-major
    y = seq[:, MARKOV_CONTEXT:].reshape(-1)
    # Entropy rate of the chain = the best achievable next-token loss (for reference in reports).
    h = -(p * np.log(np.clip(p, 1e-30, None))).sum(-1).mean()
    return x, y, {"vocab_size": MARKOV_VOCAB, "context": MARKOV_CONTEXT, "n_classes": MARKOV_VOCAB,
                  "chains": MARKOV_CHAINS, "entropy_rate_nats": float(h)}


BUILTINS = {"digits": _digits, "clusters": _clusters, "markov": _markov}


def builtin_names() -> list[str]:
    return sorted(BUILTINS)
