"""The paper's two-moons experiment (section 3.1): supervised, pseudo labels, UDA alone and MPL
on 2000 points of which 6 are labeled, beside a student trained on every point's true label,
and a PNG of the five decision boundaries.

    python examples/two_moons.py                      # writes docs/two_moons.png (about 10 minutes)
    python examples/two_moons.py --seed 1 --out moons.png

Each method runs the `two-moons` preset of ``python -m mpl_fast.train`` (same data, model,
steps); the boundary drawn is that of the method's student (for supervised: the one model).
"UDA alone" is MPL's step with --mpl.mpl-weight 0 (a UDA teacher, no MPL term); "true labels"
is --method supervised with all 2000 points labeled, one full batch per step.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from mpl_fast import checkpoint as ckpt  # noqa: E402
from mpl_fast.data import build_streams  # noqa: E402
from mpl_fast.models import create_model  # noqa: E402
from mpl_fast.train import run  # noqa: E402
from mpl_fast.train.config import preset  # noqa: E402

# (name, title, trainer method, overrides)
METHODS = (("supervised", "Supervised", "supervised", {}),
           ("pseudo-labels", "Pseudo Labels", "pseudo-labels", {}),
           ("uda", "UDA alone (MPL term off)", "mpl", {"mpl.mpl_weight": 0.0}),
           ("mpl", "Meta Pseudo Labels (UDA + MPL)", "mpl", {}),
           ("true-labels", "Student on all true labels", "supervised",
            {"data.labels_per_class": 1000, "data.batch_size": 2000}))


def train(name: str, method: str, overrides: dict, seed: int, steps: int | None, out_root: str):
    cfg = preset("two-moons")
    cfg.method, cfg.seed, cfg.threads = method, seed, 1
    for dotted, value in overrides.items():  # e.g. "mpl.mpl_weight"
        section, field = dotted.split(".")
        setattr(getattr(cfg, section), field, value)
    if steps:
        cfg.steps = steps
    cfg.output_dir = os.path.join(out_root, name)
    summary = run(cfg, progress=False, quiet=True)
    model = create_model("two-moons-mlp", 2)
    model.load_state_dict(ckpt.load(os.path.join(cfg.output_dir, "checkpoint.pt"))["mpl"]["student"])
    return model.eval(), summary["test_top1"]["student"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=None, help="override the preset's step count")
    parser.add_argument("--out", default=os.path.join("docs", "two_moons.png"))
    args = parser.parse_args(argv)

    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    cfg = preset("two-moons")
    streams = build_streams(cfg.data, seed=args.seed)
    x_test = torch.cat([x for x, _ in streams.test])
    from mpl_fast.data.embedded import _load  # noqa: PLC0415

    x_train, y_train = _load("two-moons")[:2]
    labeled = np.array(streams.split["labeled"])

    lo, hi = x_test.min(0).values - 0.5, x_test.max(0).values + 0.5
    gx, gy = torch.meshgrid(torch.linspace(lo[0], hi[0], 300), torch.linspace(lo[1], hi[1], 300), indexing="xy")
    grid = torch.stack([gx.reshape(-1), gy.reshape(-1)], 1)

    fig, axes = plt.subplots(1, len(METHODS), figsize=(5 * len(METHODS), 4.8), sharex=True, sharey=True)
    with tempfile.TemporaryDirectory(prefix="two-moons-") as tmp:
        for ax, (name, title, method, overrides) in zip(axes, METHODS):
            model, acc = train(name, method, overrides, args.seed, args.steps, tmp)
            with torch.no_grad():
                p1 = torch.softmax(model(grid), 1)[:, 1].reshape(gx.shape)
            ax.contourf(gx, gy, p1, levels=20, cmap="RdBu_r", alpha=0.35, vmin=0, vmax=1)
            ax.contour(gx, gy, p1, levels=[0.5], colors="k", linewidths=2)
            ax.scatter(x_train[:, 0], x_train[:, 1], c=np.where(y_train == 1, "#d6604d", "#4393c3"), s=4, alpha=0.5)
            ax.scatter(x_train[labeled, 0], x_train[labeled, 1], c=np.where(y_train[labeled] == 1, "red", "blue"),
                       s=160, marker="*", edgecolors="k", linewidths=1.2, zorder=3)
            ax.set_title(f"{title}\ntest accuracy {acc:.1f}%")
            print(f"{title:<32} test top-1 {acc:.1f}%", flush=True)
    fig.suptitle(f"Two moons, 2000 points, 6 labeled (stars); student decision boundary (seed {args.seed})")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    fig.savefig(args.out, dpi=80)
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
