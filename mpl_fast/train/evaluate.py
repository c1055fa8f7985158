"""What a run measures and reports: accuracies during training, the selection of the
best-validation weights, the finetuned student, and the summary."""

from __future__ import annotations

import copy

import torch

from mpl_fast.algo import finetune, larger_batches
from mpl_fast.algo.selection import selected_network
from mpl_fast.parallel import sharding
from mpl_fast.train.checkpointing import save_finetuned
from mpl_fast.train.config import TrainConfig
from mpl_fast.train.errors import RunStopped


@torch.no_grad()
def accuracy(model: torch.nn.Module, batches) -> float | None:
    """Top-1 accuracy in percent over a finite iterable of batches (None when it is empty)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device  # model-parallel: the data may live on the other device
    correct = torch.zeros((), dtype=torch.int64, device=device)
    total = 0
    for x, y in batches:
        correct += (model(x.to(device)).argmax(1) == y.to(device)).sum()
        total += len(y)
    model.train(was_training)
    return None if total == 0 else 100.0 * int(correct) / total


def selection_model(cfg: TrainConfig) -> str:
    """The model whose best-validation weights are kept (and finetuned): mpl_fast.algo.selection's rule."""
    return selected_network(cfg.method, cfg.mpl.ema_decay > 0)


def headline_model(cfg: TrainConfig) -> str:
    """What a method delivers: UDA's teacher; otherwise the selected student, finetuned when
    the preset finetunes."""
    if cfg.method != "uda" and cfg.finetune.steps > 0:
        return "finetuned"
    return selection_model(cfg)


def models_to_evaluate(sess) -> dict:
    """The networks as evaluation sees them: the live ones; under --fsdp, every rank all-gathers
    each network's weights and rank 0 loads them into its unsharded replicas (the other ranks get
    nothing). Every forward of a sharded network is collective, so rank 0 alone cannot run one."""
    models = sess.mpl.models()
    if not sess.cfg.fsdp:
        return models
    replicas = {}
    for name, model in models.items():
        state = sharding.full_state_dict(model.state_dict())  # collective: every rank
        if sess.make_replica is None:
            continue
        if name not in sess.replicas:  # built once; its random init must not move the run's RNG
            with torch.random.fork_rng(devices=[]):
                sess.replicas[name] = sess.make_replica()
        sess.replicas[name].load_state_dict(state)
        replicas[name] = sess.replicas[name]
    return replicas


def evaluate(sess, step: int, seconds: float) -> dict | None:
    """Validation (selection) and test (report only) accuracy of every model; keeps the best-val weights.
    Model-parallel ranks each measure the networks they hold; rank 0 writes the merged line.
    Under --fsdp every rank calls this (to gather the weights) and only rank 0 measures (the
    others get None)."""
    models = models_to_evaluate(sess)
    if not sess.evaluates:
        return None
    sess.evaluated_models = models
    cfg, streams, best = sess.cfg, sess.streams, sess.best
    line = {"step": step, "eval": True, "seconds": seconds}
    for name, model in models.items():
        line[f"val_{name}"] = accuracy(model, streams.val)
        line[f"test_{name}"] = accuracy(model, streams.test)
    line = sess.sync.merge(line)
    sel = selection_model(cfg)
    val = line.get(f"val_{sel}")
    if val is not None and val > best["val"]:
        best.update(val=val, step=step,
                    state={k: v.detach().cpu().clone() for k, v in models[sel].state_dict().items()}
                    if sel in models else None)
    sess.write_metrics(line)
    if sess.curves is not None and step < cfg.steps:  # the end draws after the final line (finish)
        sess.curves.update()
    return line


def finish(sess, step: int, seconds: float, final: dict, stop=None) -> dict:
    """Final accuracies, the finetuned student, and the summary dict. ``final`` is the last
    evaluation's line (every model's accuracies at this step, merged across model-parallel
    ranks): the models have not changed since, so they are not measured again. ``stop()``, when
    given, is polled after each finetune step; a signal number from it raises RunStopped."""
    cfg, mpl, streams, best = sess.cfg, sess.mpl, sess.streams, sess.best
    val = {k[len("val_"):]: v for k, v in final.items() if k.startswith("val_")}
    test = {k[len("test_"):]: v for k, v in final.items() if k.startswith("test_")}
    models = sess.evaluated_models  # what the final evaluation measured (--fsdp: rank 0's replicas)
    if selection_model(cfg) in models:  # model parallel: on the rank that holds it
        finish_selected(cfg, models, streams, best, val, test, quiet=not sess.ctx.is_main, stop=stop)
    val, test = sess.sync.merge(val), sess.sync.merge(test)
    headline = headline_model(cfg)
    if headline == "ema" or headline == "student":
        headline = "selected" if best["step"] >= 0 else headline
    sess.write_metrics({"step": step, "final": True, **{f"val_{k}": v for k, v in val.items()},
                        **{f"test_{k}": v for k, v in test.items()}})
    if sess.curves is not None:
        sess.curves.update(final=True)
    sel = selection_model(cfg)
    selected_step = best["step"] if cfg.finetune.start_from == "best-val" else step
    return {
        "method": cfg.method, "preset": cfg.preset, "seed": cfg.seed, "steps": step, "seconds": round(seconds, 2),
        "feedback": cfg.mpl.feedback if cfg.method in ("mpl", "reduced-mpl") else None,
        "test_top1": test, "val_top1": val, "selected": {"model": sel, "step": selected_step, "rule": cfg.finetune.start_from,
                                                       "val": best["val"] if cfg.finetune.start_from == "best-val"
                                                       else val.get("selected")},
        "headline": {"model": headline, "test_top1": test.get(headline)},
        "skipped_steps": int(mpl.skipped_total), "output_dir": cfg.output_dir,
    }


def finish_selected(cfg: TrainConfig, models: dict, streams, best: dict, val: dict, test: dict,
                    quiet: bool, stop=None) -> None:
    """The selection model's kept weights (one of ``models``, unsharded): its best-validation
    weights, or its final ones with ``--finetune.start-from final``; then finetuned; their
    accuracies into val/test."""
    selected = copy.deepcopy(models[selection_model(cfg)])
    if cfg.finetune.start_from == "best-val" and best["state"] is not None:  # best on validation, never on test
        selected.load_state_dict(best["state"])
    val["selected"], test["selected"] = accuracy(selected, streams.val), accuracy(selected, streams.test)
    if cfg.finetune.steps > 0 and cfg.method != "uda":
        from tqdm import tqdm  # noqa: PLC0415

        device = next(selected.parameters()).device  # model-parallel: the student's device
        batches = ((x.to(device), y.to(device)) for x, y in larger_batches(streams.labeled, cfg.finetune.batch_size))
        with tqdm(total=cfg.finetune.steps, desc="finetune student", dynamic_ncols=True,
                  disable=True if quiet else None) as bar:
            def on_step():
                bar.update()
                if stop is not None and stop() is not None:  # SIGINT/SIGTERM: the run's end stops here
                    raise RunStopped(f"signal {stop()} during the finetune")

            finetune(selected, batches, cfg.finetune.steps, cfg.finetune.lr, cfg.finetune.momentum,
                     cfg.finetune.weight_decay, on_step=on_step)
        val["finetuned"], test["finetuned"] = accuracy(selected, streams.val), accuracy(selected, streams.test)
        save_finetuned(cfg.output_dir, selected, selection_model(cfg))  # for mpl_fast.load(..., model="finetuned")


def format_summary(s: dict) -> str:
    """The table the run prints at its end."""
    names = [k for k in ("student", "ema", "teacher", "selected", "finetuned") if k in s["test_top1"]]
    fmt = lambda v: "  -  " if v is None else f"{v:5.1f}"  # noqa: E731
    rows = [f"{'model':<10} {'val':>6} {'test':>6}"]
    rows += [f"{n:<10} {fmt(s['val_top1'][n]):>6} {fmt(s['test_top1'][n]):>6}" for n in names]
    return (f"\n{s['method']} on {s['preset']} (seed {s['seed']}, {s['steps']} steps, {s['seconds']:.1f} s, "
            f"{s['skipped_steps']} skipped)\n" + "\n".join(rows) +
            f"\n=> {s['method']}: test top-1 {s['headline']['test_top1']:.2f}% ({s['headline']['model']})\n"
            f"   written to {s['output_dir']}")
