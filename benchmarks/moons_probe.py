"""Why does MPL not find the two moons? Quick, self-contained measurements on the paper's toy.

    python benchmarks/moons_probe.py sign           # item 1: sign and alignment of the teacher's signal
    python benchmarks/moons_probe.py train --credit exact --seeds 0 1 2 3 4
    python benchmarks/moons_probe.py objective      # does the labeled loss prefer the moons at all?
    python benchmarks/moons_probe.py oracle --s-mom 0.9   # the student alone on the true labels

Everything here is plain functional PyTorch on the two-moons MLP (no trainer), so that one
variant takes seconds. ``credit`` picks the teacher's MPL signal:

  batch        h * mean_i CE(y_i, T(x_i)), one scalar h = lr_S <g_l', g_u> (the paper, grad-dot)
  per-example  mean_i h_i CE(y_i, T(x_i)), h_i = lr_S <g_l', grad l_i(theta_S)> (mean_i h_i = h)
  exact        soft labels q = softmax(T(x_u)) and the exact meta-gradient of
               CE(y_l, S(x_l; theta_S - lr_S grad CE(q, S(x_u)))) through the student's step
  none         no MPL term (a pseudo-label teacher)

Prints one line per run and the mean +- std over seeds; --json writes the same numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import common  # noqa: E402 - benchmarks/ is on the path when run as a script
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.func import functional_call, grad, jvp  # noqa: E402

from mpl_fast.data.embedded import _load, _per_class_split  # noqa: E402
from mpl_fast.models.small import TwoMoonsMLP  # noqa: E402

LABELED = "random"  # or "spread": on each moon the training points nearest its two tips and its middle


def data(seed: int):
    """(x_train, y_train, x_test, y_test, x_labeled, y_labeled) of the two-moons preset for ``seed``."""
    xtr, ytr, xte, yte, _ = _load("two-moons")
    lab, _ = _per_class_split(ytr, 3, 0, seed)
    if LABELED == "spread":  # not linearly separable: each moon's tip lies inside the other's arc
        anchors = [((-1.0, 0.0), 0), ((0.0, 1.0), 0), ((1.0, 0.0), 0), ((0.0, 0.5), 1), ((1.0, -0.5), 1), ((2.0, 0.5), 1)]
        lab = []
        for (ax, ay), c in anchors:
            d = (xtr[:, 0] - ax) ** 2 + (xtr[:, 1] - ay) ** 2 + 1e9 * (ytr != c)
            lab.append(int(d.argmin()))
    xtr, ytr, xte, yte = map(torch.from_numpy, (xtr, ytr, xte, yte))
    return xtr, ytr, xte, yte, xtr[lab], ytr[lab]


def new_params(seed: int) -> dict:
    """A fresh two-moons MLP's parameters (the paper's U(-0.1, 0.1) init) as a dict of tensors."""
    torch.manual_seed(seed)
    return {k: v.detach().clone() for k, v in TwoMoonsMLP().named_parameters()}


MODEL = TwoMoonsMLP()


def f(params: dict, x: torch.Tensor) -> torch.Tensor:
    """The MLP's logits with ``params``."""
    return functional_call(MODEL, params, (x,))


def ce(logits, target):
    """Mean CE against class indices or distributions."""
    if target.dtype == torch.int64:
        return F.cross_entropy(logits, target)
    return -(target * F.log_softmax(logits, 1)).sum(1).mean()


def acc(params, x, y) -> float:
    """Top-1 accuracy in %."""
    with torch.no_grad():
        return (f(params, x).argmax(1) == y).float().mean().item() * 100


class Opt:
    """SGD with momentum or Adam on a dict of tensors."""

    def __init__(self, params, lr, kind="sgd", momentum=0.0):
        self.lr, self.kind, self.m = lr, kind, momentum
        self.buf = {k: torch.zeros_like(v) for k, v in params.items()}
        self.v = {k: torch.zeros_like(v) for k, v in params.items()}
        self.t = 0

    def step(self, params, grads):
        self.t += 1
        out = {}
        for k, p in params.items():
            g = grads[k]
            if self.kind == "adam":
                self.buf[k] = 0.9 * self.buf[k] + 0.1 * g
                self.v[k] = 0.999 * self.v[k] + 0.001 * g * g
                mh = self.buf[k] / (1 - 0.9 ** self.t)
                vh = self.v[k] / (1 - 0.999 ** self.t)
                out[k] = p - self.lr * mh / (vh.sqrt() + 1e-8)
            else:
                if self.m:
                    self.buf[k] = self.m * self.buf[k] + g
                    g = self.buf[k]
                out[k] = p - self.lr * g
        return out


def labels_from(t_logits, kind, gen):
    """The teacher's pseudo labels: argmax, a sample from softmax, or softmax itself."""
    p = torch.softmax(t_logits.detach(), 1)
    if kind == "hard":
        return p.argmax(1)
    if kind == "sample":
        return torch.multinomial(p, 1, generator=gen).squeeze(1)
    return p  # soft, temperature 1


def per_example_h(ps, x_u, y_hat, g_l_new, lr_s):
    """h_i = lr_S <g_l', grad_theta l_i(theta_S)>: one forward-mode JVP along g_l'."""
    def losses(p):
        return F.cross_entropy(f(p, x_u), y_hat, reduction="none") if y_hat.dtype == torch.int64 else \
            -(y_hat * F.log_softmax(f(p, x_u), 1)).sum(1)
    _, d = jvp(losses, (ps,), (g_l_new,))
    return lr_s * d


def train(seed, steps=4000, credit="batch", labels="sample", lr_t=1.0, lr_s=1.0, u_batch=12,
          sup_weight=1.0, mpl_weight=1.0, s_opt="sgd", s_mom=0.0, t_opt="sgd", t_mom=0.0, jitter=0.05,
          baseline=0.0, log=False):
    """One teacher-student run with the given MPL signal (see the module docstring); the
    student's and teacher's test accuracy at the end and the mean and std of h."""
    xtr, ytr, xte, yte, xl, yl = data(seed)
    pt, ps = new_params(1000 + seed), new_params(2000 + seed)
    ot, os_ = Opt(pt, lr_t, t_opt, t_mom), Opt(ps, lr_s, s_opt, s_mom)
    gen = torch.Generator().manual_seed(seed)
    b = 0.0
    hs = []
    for step in range(steps):
        if u_batch >= len(xtr):
            xu = xtr
        else:
            xu = xtr[torch.randint(0, len(xtr), (u_batch,), generator=gen)]
        xu = xu + jitter * torch.randn(xu.shape, generator=gen)
        t_logits_u = f(pt, xu)
        if credit == "exact":
            def meta_loss(pt_):
                q = torch.softmax(f(pt_, xu), 1)
                g_u = grad(lambda p: ce(f(p, xu), q))(ps)
                ps_new = {k: ps[k] - lr_s * g_u[k] for k in ps}
                return ce(f(ps_new, xl), yl)
            g_t_mpl = grad(meta_loss)(pt)
            q = torch.softmax(t_logits_u.detach(), 1)
            g_u = grad(lambda p: ce(f(p, xu), q))(ps)
            g_t_sup = grad(lambda p: ce(f(p, xl), yl))(pt)
            g_t = {k: sup_weight * g_t_sup[k] + mpl_weight * g_t_mpl[k] for k in pt}
            ps = os_.step(ps, g_u)
        else:
            y_hat = labels_from(t_logits_u, labels, gen)
            g_u = grad(lambda p: ce(f(p, xu), y_hat))(ps)
            ps_before = ps
            ps = os_.step(ps, g_u)
            g_l_new = grad(lambda p: ce(f(p, xl), yl))(ps)
            if credit == "batch":
                h = lr_s * sum((g_l_new[k] * g_u[k]).sum() for k in ps)
                weights = h.expand(len(xu))
            elif credit == "per-example":
                weights = per_example_h(ps_before, xu, y_hat, g_l_new, lr_s)
                h = weights.mean()
            else:
                h = torch.zeros(())
                weights = torch.zeros(len(xu))
            if baseline:
                b = baseline * b + (1 - baseline) * h.item()
                weights = weights - b
            hs.append(h.item())

            def t_loss(p):
                lu = f(p, xu)
                lsup = ce(f(p, xl), yl)
                if y_hat.dtype == torch.int64:
                    lm = (weights * F.cross_entropy(lu, y_hat, reduction="none")).mean()
                else:
                    lm = (weights * -(y_hat * F.log_softmax(lu, 1)).sum(1)).mean()
                return sup_weight * lsup + mpl_weight * lm
            g_t = grad(t_loss)(pt)
        pt = ot.step(pt, g_t)
        if log and step % 1000 == 0:
            print(f"    step {step}: student {acc(ps, xte, yte):.1f} teacher {acc(pt, xte, yte):.1f}", flush=True)
    return {"student": acc(ps, xte, yte), "teacher": acc(pt, xte, yte),
            "h_mean": statistics.mean(hs) if hs else 0.0, "h_std": statistics.pstdev(hs) if hs else 0.0}


def oracle(seed, steps, lr, s_opt, s_mom, u_batch=12, labeled_only=False):
    """The student alone on TRUE labels of all points (or only the 6 labeled: supervised)."""
    xtr, ytr, xte, yte, xl, yl = data(seed)
    ps = new_params(2000 + seed)
    o = Opt(ps, lr, s_opt, s_mom)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        if labeled_only:
            x, y = xl, yl
        else:
            i = torch.randint(0, len(xtr), (u_batch,), generator=gen) if u_batch < len(xtr) else torch.arange(len(xtr))
            x, y = xtr[i], ytr[i]
        ps = o.step(ps, grad(lambda p: ce(f(p, x), y))(ps))
    return acc(ps, xte, yte)


def sign_check(seed, lr_s=1.0, warm_steps=0, n_samples=400, eps=1e-3):
    """The first-order objective of the teacher is J(theta_T) = CE_l(student after one
    step on labels drawn from T); the expected student step under sampled labels equals the step
    on soft labels q = softmax(T) (CE is linear in its target), so grad J is the exact meta-
    gradient for soft labels. Compare with the teacher's MPL gradient (descending h * CE) for
    batch and per-example credit, averaged over n_samples draws of the labels."""
    xtr, ytr, xte, yte, xl, yl = data(seed)
    pt, ps = new_params(1000 + seed), new_params(2000 + seed)
    gen = torch.Generator().manual_seed(seed)
    # optionally warm both up on the labeled data so the state is not the symmetric init
    for _ in range(warm_steps):
        pt = {k: pt[k] - 1.0 * v for k, v in grad(lambda p: ce(f(p, xl), yl))(pt).items()}
        ps = {k: ps[k] - 1.0 * v for k, v in grad(lambda p: ce(f(p, xl), yl))(ps).items()}
    xu = xtr

    def J(pt_):
        q = torch.softmax(f(pt_, xu), 1)
        g_u = grad(lambda p: ce(f(p, xu), q))(ps)
        return ce(f({k: ps[k] - lr_s * g_u[k] for k in ps}, xl), yl)

    g_exact = grad(J)(pt)
    flat = lambda d: torch.cat([v.reshape(-1) for v in d.values()])  # noqa: E731
    ge = flat(g_exact)
    est = {"batch": torch.zeros_like(ge), "per-example": torch.zeros_like(ge)}
    single_cos = {"batch": [], "per-example": []}
    logits = f(pt, xu).detach()
    for _ in range(n_samples):
        y = torch.multinomial(torch.softmax(logits, 1), 1, generator=gen).squeeze(1)
        g_u = grad(lambda p: ce(f(p, xu), y))(ps)
        ps_new = {k: ps[k] - lr_s * g_u[k] for k in ps}
        g_l_new = grad(lambda p: ce(f(p, xl), yl))(ps_new)
        h = lr_s * sum((g_l_new[k] * g_u[k]).sum() for k in ps)
        h_i = per_example_h(ps, xu, y, g_l_new, lr_s)
        for name, w in (("batch", h.expand(len(xu))), ("per-example", h_i)):
            g = flat(grad(lambda p: (w * F.cross_entropy(f(p, xu), y, reduction="none")).mean())(pt))
            est[name] += g / n_samples
            single_cos[name].append(F.cosine_similarity(g, ge, 0).item())
    out = {"J0": J(pt).item(), "|grad J|": ge.norm().item()}
    for name, g in est.items():
        gd = {}
        i = 0
        for k, v in pt.items():
            gd[k] = g[i:i + v.numel()].view_as(v)
            i += v.numel()
        # descend the estimate: does J (the student's labeled loss after its step) go down?
        step = eps / max(g.norm().item(), 1e-12)
        out[name] = {"cos(mean est, exact)": F.cosine_similarity(g, ge, 0).item(),
                     "mean cos(one draw, exact)": statistics.mean(single_cos[name]),
                     "J after step along -est minus J0": J({k: pt[k] - step * gd[k] for k in pt}).item() - out["J0"]}
    out["J after step along -exact minus J0"] = J({k: pt[k] - eps / ge.norm().item() * g_exact[k] for k in pt}).item() - out["J0"]
    return out


def objective(seed, steps=3000, checkpoints=(100, 300, 1000, 2999)):
    """Does MPL's objective, the student's CE on the labeled points, prefer the moons? A student
    (SGD lr 1, momentum 0.9, all 2000 points per step) learns (a) the TRUE labels, (b) the
    labels of a supervised teacher fitted to the 6 labeled points; its labeled CE along the way."""
    xtr, ytr, xte, yte, xl, yl = data(seed)
    pt = new_params(1000 + seed)
    o = Opt(pt, 1.0, "sgd", 0.9)
    for _ in range(2000):
        pt = o.step(pt, grad(lambda p: ce(f(p, xl), yl))(pt))
    linear = f(pt, xtr).argmax(1).detach()
    out = {"supervised teacher's train accuracy": (linear == ytr).float().mean().item() * 100}
    for name, labels in (("true labels", ytr), ("supervised teacher's labels", linear)):
        ps = new_params(2000 + seed)
        o = Opt(ps, 1.0, "sgd", 0.9)
        curve = {}
        for s in range(steps):
            ps = o.step(ps, grad(lambda p: ce(f(p, xtr), labels))(ps))
            if s in checkpoints:
                curve[s + 1] = ce(f(ps, xl), yl).item()
        out[name] = {"labeled CE after steps": curve, "student test accuracy": acc(ps, xte, yte)}
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["sign", "train", "oracle", "objective"])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=4000)
    ap.add_argument("--credit", default="batch", choices=["batch", "per-example", "exact", "none"])
    ap.add_argument("--labels", default="sample", choices=["sample", "hard", "soft"])
    ap.add_argument("--lr-t", type=float, default=1.0)
    ap.add_argument("--lr-s", type=float, default=1.0)
    ap.add_argument("--u-batch", type=int, default=12)
    ap.add_argument("--sup-weight", type=float, default=1.0)
    ap.add_argument("--mpl-weight", type=float, default=1.0)
    ap.add_argument("--s-opt", default="sgd", choices=["sgd", "adam"])
    ap.add_argument("--t-opt", default="sgd", choices=["sgd", "adam"])
    ap.add_argument("--s-mom", type=float, default=0.0)
    ap.add_argument("--t-mom", type=float, default=0.0)
    ap.add_argument("--baseline", type=float, default=0.0)
    ap.add_argument("--warm", type=int, default=0, help="sign: steps of supervised warm-up of both models first")
    ap.add_argument("--eps", type=float, default=1e-3, help="sign: length of the test step on the teacher")
    ap.add_argument("--labeled-only", action="store_true")
    ap.add_argument("--log", action="store_true")
    ap.add_argument("--labeled", default="random", choices=["random", "spread"],
                    help="random: 3 per class drawn by the seed (the presets); spread: fixed tips and middles")
    common.add_common_flags(ap, quick="seed 0 only, 1000 steps", devices=("cpu",), threads=1,
                            threads_help="torch threads (default 1)",
                            profile="write a torch.profiler Chrome trace of the runs")
    a = ap.parse_args(argv)
    global LABELED
    LABELED = a.labeled
    if a.quick:
        a.seeds, a.steps = [0], 1000
    profiler = None
    if a.profile:
        import torch.profiler as tp  # noqa: PLC0415

        profiler = tp.profile(activities=[tp.ProfilerActivity.CPU])
        profiler.__enter__()
    common.apply_threads(a.threads)
    rows = []
    for seed in a.seeds:
        t0 = time.perf_counter()
        if a.what == "sign":
            r = sign_check(seed, a.lr_s, a.warm, eps=a.eps)
            print(f"seed {seed}: {json.dumps(r, indent=1)}", flush=True)
        elif a.what == "objective":
            r = objective(seed)
            print(f"seed {seed}: {json.dumps(r)}", flush=True)
        elif a.what == "oracle":
            r = {"student": oracle(seed, a.steps, a.lr_s, a.s_opt, a.s_mom, a.u_batch, a.labeled_only)}
        else:
            r = train(seed, a.steps, a.credit, a.labels, a.lr_t, a.lr_s, a.u_batch, a.sup_weight, a.mpl_weight,
                      a.s_opt, a.s_mom, a.t_opt, a.t_mom, baseline=a.baseline, log=a.log)
        r["seed"], r["seconds"] = seed, round(time.perf_counter() - t0, 1)
        rows.append(r)
        if a.what in ("train", "oracle"):
            print(f"seed {seed}: " + " ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                              for k, v in r.items()), flush=True)
    if a.what in ("train", "oracle"):
        s = [r["student"] for r in rows]
        print(f"student {statistics.mean(s):.2f} ± {statistics.stdev(s) if len(s) > 1 else 0:.2f}  "
              f"args {vars(a)}")
    if profiler is not None:
        profiler.__exit__(None, None, None)
        os.makedirs(a.profile, exist_ok=True)
        profiler.export_chrome_trace(os.path.join(a.profile, f"moons_probe_{a.what}.json"))
    common.write_results(a, "moons_probe", {"args": vars(a), "runs": rows},
                         tag=a.what + (f"_{a.credit}" if a.what == "train" else ""))


if __name__ == "__main__":
    main()
