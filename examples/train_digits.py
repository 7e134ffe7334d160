"""Train a small embedding MLP on scikit-learn's bundled digits with each fused flashdml loss.

The metric-learning protocol, in miniature: the network only ever sees classes 0-4 (70 % of their images); it is
evaluated on the *unseen* classes 5-9 (all their images, retrieval among themselves) and on the held-out 30 % of
classes 0-4. For every loss the script prints recall@1, MAP@R and OPIS before and after training (from one
``fd.metrics.evaluate`` pass per split), saves a figure of the training curves, saves the final embeddings of
one model and runs the evaluation CLI on them.

    python examples/train_digits.py                       # all four losses, 30 epochs, output in examples/digits_out
    python examples/train_digits.py --losses xe ntxent --epochs 10 --out /tmp/digits
    python examples/train_digits.py --quick               # the smoke test CI runs (a few seconds of training)

Needs scikit-learn, pytorch-metric-learning (its MPerClassSampler) and matplotlib besides torch and flashdml.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time

import numpy as np
import torch
from torch import nn

import flashdml as fd

LOSSES = ("xe", "ntxent", "ntxent_tcm", "contextual")
LOSS_TITLES = {
    "xe": "Cross-Example Softmax, learnable τ",
    "ntxent": "NT-Xent",
    "ntxent_tcm": "NT-Xent + TCM",
    "contextual": "contextual loss",
}
METRICS = ("recall_at_k", "map_at_r", "opis")
SEEN, UNSEEN = (0, 1, 2, 3, 4), (5, 6, 7, 8, 9)


def parse_args(argv=None) -> argparse.Namespace:
    here = os.path.dirname(os.path.abspath(__file__))
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--epochs", type=int, default=30, help="training epochs per loss (default 30)")
    ap.add_argument("--out", default=os.path.join(here, "digits_out"),
                    help="output folder for the figure, metrics.json and embeddings (default examples/digits_out)")
    ap.add_argument("--losses", nargs="+", choices=LOSSES, default=list(LOSSES), help="which losses to train")
    ap.add_argument("--seed", type=int, default=0, help="seed of the split, the initialisation and the sampler")
    ap.add_argument("--m", type=int, default=16, help="samples per class in a batch (MPerClassSampler's m)")
    ap.add_argument("--lr", type=float, default=3e-3, help="Adam learning rate")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: small, reproducible)")
    ap.add_argument("--quick", action="store_true",
                    help="smoke test: 2 epochs of 5 batches each (overrides --epochs)")
    args = ap.parse_args(argv)
    if args.quick:
        args.epochs = 2
    if args.epochs < 1 or args.m < 2:
        ap.error("--epochs must be >= 1 and --m >= 2")
    return args


# ----------------------------------------------------------------------------------------------------- data


def load_splits(seed: int):
    """Digits as float32 in [0, 1]: (train, held-out) images of classes 0-4 (70 / 30 % per class) and the
    unseen classes 5-9. Each split is a pair (x [n, 64], labels [n])."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.from_numpy(digits.data.astype(np.float32) / 16.0)
    y = torch.from_numpy(digits.target.astype(np.int64))
    rng = np.random.default_rng(seed)
    train_idx, held_idx = [], []
    for c in SEEN:
        idx = np.flatnonzero(digits.target == c)
        rng.shuffle(idx)
        n_held = int(round(0.3 * len(idx)))
        held_idx.append(idx[:n_held])
        train_idx.append(idx[n_held:])
    train_idx, held_idx = np.sort(np.concatenate(train_idx)), np.sort(np.concatenate(held_idx))
    unseen = torch.from_numpy(np.isin(digits.target, UNSEEN))
    return (x[train_idx], y[train_idx]), (x[held_idx], y[held_idx]), (x[unseen], y[unseen])


def make_model() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 32))


# ----------------------------------------------------------------------------------------------------- losses


def make_loss(name: str, m: int):
    """``(loss_fn(emb, labels) -> 0-dim tensor, extra parameters to optimise, description of the extras)``.

    Functional API throughout. The XE temperature is learned as log τ (an ``nn.Parameter``), so τ = exp(log τ)
    stays positive whatever step the optimiser takes; flashdml differentiates through the temperature tensor.
    """
    if name == "xe":
        log_tau = nn.Parameter(torch.tensor(math.log(0.1)))

        def xe(emb, labels):
            return fd.cross_example_softmax(emb, labels=labels, temperature=log_tau.exp())

        return xe, [log_tau], lambda: {"temperature": float(log_tau.detach().exp())}
    if name == "ntxent":
        return (lambda emb, labels: fd.ntxent(emb, labels, temperature=0.1)), [], dict
    if name == "ntxent_tcm":
        def ntxent_tcm(emb, labels):
            return (fd.ntxent(emb, labels, temperature=0.1)
                    + fd.threshold_consistent_margin(emb, labels, pos_margin=0.9, neg_margin=0.5))

        return ntxent_tcm, [], dict
    if name == "contextual":
        # the paper's 224-px recipe with lam = 0.2: k = samples per class, weights 1 - lam / lam
        return (lambda emb, labels: fd.contextual_loss(emb, labels, k=m, eps=0.05, context_weight=0.8,
                                                       contrastive_weight=0.2, reg_weight=0.1, reg_target=0.3)), [], dict
    raise ValueError(f"unknown loss {name!r}")


# ----------------------------------------------------------------------------------------------------- train / eval


@torch.no_grad()
def embed(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    emb = model(x)
    model.train()
    return emb


def evaluate(model: nn.Module, splits: dict) -> dict:
    """``{split: {"recall@1", "map@r", "opis", "eps_opis"}}``, self-mode retrieval within each split."""
    return {name: fd.metrics.evaluate(embed(model, x), y, metrics=METRICS, ks=(1,), progress=False)
            for name, (x, y) in splits.items()}


def batches(labels: torch.Tensor, m: int, n_batches: int, seed: int):
    """Index batches of ``m`` images for each of the training classes, from pml's MPerClassSampler."""
    from pytorch_metric_learning.samplers import MPerClassSampler

    n_classes = int(labels.unique().numel())
    batch_size = m * n_classes
    sampler = MPerClassSampler(labels, m=m, batch_size=batch_size, length_before_new_iter=batch_size * n_batches)
    np.random.seed(seed)  # the sampler draws from numpy's global generator
    idx = torch.tensor(list(iter(sampler)), dtype=torch.long)
    return idx.view(n_batches, batch_size)


def train_one(name: str, args, train, splits: dict, n_batches: int) -> dict:
    torch.manual_seed(args.seed)
    model = make_model()
    loss_fn, extra_params, extras = make_loss(name, args.m)
    opt = torch.optim.Adam(list(model.parameters()) + extra_params, lr=args.lr)
    x_train, y_train = train
    history = {"epoch": [0], "loss": [], "eval": [evaluate(model, splits)], "extras": [extras()]}
    t0 = time.perf_counter()
    for epoch in range(1, args.epochs + 1):
        losses = []
        for idx in batches(y_train, args.m, n_batches, args.seed * 1000 + epoch):
            loss = loss_fn(model(x_train[idx]), y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
        history["epoch"].append(epoch)
        history["loss"].append(float(np.mean(losses)))
        history["eval"].append(evaluate(model, splits))
        history["extras"].append(extras())
    history["seconds"] = time.perf_counter() - t0
    history["model"] = model
    return history


# ----------------------------------------------------------------------------------------------------- output


def no_nan(obj):
    """The same structure with NaN floats as None, so metrics.json is strict JSON."""
    if isinstance(obj, dict):
        return {k: no_nan(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [no_nan(v) for v in obj]
    return None if isinstance(obj, float) and math.isnan(obj) else obj


def fmt(v: float) -> str:
    return "   nan" if v is None or math.isnan(v) else f"{v:6.3f}"


def print_table(results: dict, split_titles: dict) -> None:
    cols = ("recall@1", "map@r", "opis")
    head = f"{'loss':<50}{'split':<22}" + "".join(f"{c + ' before':>16}{'after':>8}" for c in cols)
    print(head)
    print("-" * len(head))
    for name, hist in results.items():
        before, after = hist["eval"][0], hist["eval"][-1]
        title = LOSS_TITLES[name]
        if name == "xe":
            title += f" (τ → {hist['extras'][-1]['temperature']:.3f})"
        for split in split_titles:
            row = f"{title:<50}{split_titles[split]:<22}"
            row += "".join(f"{fmt(before[split][c]):>16}{fmt(after[split][c]):>8}" for c in cols)
            print(row)
            title = ""
    print("(OPIS: lower is better; the paper's threshold-inconsistency measure over FAR 1e-2 .. 1e-1)")


def plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for i, (name, hist) in enumerate(results.items()):
        color = f"C{i}"
        epochs = hist["epoch"]
        axes[0].plot(epochs[1:], hist["loss"], color=color, marker=".", label=LOSS_TITLES[name])
        for ax, split in ((axes[1], "unseen"), (axes[2], "held_out")):
            ax.plot(epochs, [e[split]["recall@1"] for e in hist["eval"]], color=color, marker=".",
                    label=f"{LOSS_TITLES[name]} recall@1")
            ax.plot(epochs, [e[split]["map@r"] for e in hist["eval"]], color=color, linestyle="--",
                    label=f"{LOSS_TITLES[name]} MAP@R")
    axes[0].set(title="training loss (mean over the epoch's batches)", xlabel="epoch", ylabel="loss")
    axes[0].set_yscale("log")
    for ax, title in ((axes[1], "unseen classes 5–9"), (axes[2], "held-out images of classes 0–4")):
        ax.set(title=title, xlabel="epoch (0 = before training)", ylabel="recall@1 (solid), MAP@R (dashed)")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    train, held_out, unseen = load_splits(args.seed)
    splits = {"unseen": unseen, "held_out": held_out}
    split_titles = {"unseen": "unseen 5-9", "held_out": "held-out imgs of 0-4"}
    n_batches = 5 if args.quick else max(1, len(train[1]) // (args.m * len(SEEN)))
    print(f"train: {len(train[1])} images of classes 0-4, {n_batches} batches of {args.m} x 5 per epoch, "
          f"{args.epochs} epochs; eval: {len(unseen[1])} unseen (5-9), {len(held_out[1])} held-out (0-4)")

    results = {}
    for name in args.losses:
        results[name] = train_one(name, args, train, splits, n_batches)
        print(f"  {name}: {results[name]['seconds']:.1f} s, final loss {results[name]['loss'][-1]:.4f}")
    print()
    print_table(results, split_titles)

    fig_path = os.path.join(args.out, "digits_curves.png")
    plot(results, fig_path)
    summary = {name: {k: hist[k] for k in ("epoch", "loss", "eval", "extras")} for name, hist in results.items()}
    with open(os.path.join(args.out, "metrics.json"), "w") as f:
        json.dump(no_nan({"args": vars(args), "results": summary}), f, indent=1)
    print(f"\nfigure: {fig_path}\nmetrics: {os.path.join(args.out, 'metrics.json')}")

    # the embeddings of the unseen classes from the last model trained, through the command-line evaluator
    last = args.losses[-1]
    x_unseen, y_unseen = unseen
    np.save(os.path.join(args.out, "emb.npy"), embed(results[last]["model"], x_unseen).numpy())
    np.save(os.path.join(args.out, "labels.npy"), y_unseen.numpy())
    cmd = [sys.executable, "-m", "flashdml.evaluate", os.path.join(args.out, "emb.npy"),
           os.path.join(args.out, "labels.npy"), "--ks", "1", "10", "--no-progress"]
    print(f"\n$ python -m flashdml.evaluate {args.out}/emb.npy {args.out}/labels.npy --ks 1 10   "
          f"# {LOSS_TITLES[last]}, unseen classes")
    proc = subprocess.run(cmd, capture_output=True, text=True)
    print(proc.stdout, end="")
    if proc.returncode != 0:
        print(proc.stderr, file=sys.stderr, end="")
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
