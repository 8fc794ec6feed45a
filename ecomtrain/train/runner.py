"""``ecomtrain train``: recipe -> data (built if missing) -> fit -> val/test -> RUN_DIR.

    ecomtrain train recipes/quickstart.yaml trainer.max_epochs=3

RUN_DIR holds ``recipe.yaml`` (resolved, secret-free), ``checkpoints/``,
``metrics.json`` (flat: ``test/ndcg@10``, ``baseline/popularity/test/ndcg@10``,
...), ``logs/`` (CSV) and ``wandb/``. The last printed line names RUN_DIR.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from pathlib import Path
from typing import Optional, Sequence

from ..config import Recipe, dump_recipe, redact


def global_rank() -> int:
    for var in ("RANK", "SLURM_PROCID", "LOCAL_RANK"):
        if var in os.environ:
            return int(os.environ[var])
    return 0


def resolve_run_dir(cfg: Recipe) -> Path:
    if cfg.run.dir:
        return Path(cfg.run.dir)
    # every rank must agree on the folder: take a stamp the launcher shares
    stamp = os.environ.get("ECOMTRAIN_RUN_STAMP") or os.environ.get("SLURM_JOB_ID")
    if not stamp and os.environ.get("TORCHELASTIC_RUN_ID", "none") != "none":
        stamp = os.environ["TORCHELASTIC_RUN_ID"]
    if not stamp:
        stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path(cfg.run.out_dir) / f"{cfg.run.name}-{stamp}"


def ensure_dataset(cfg: Recipe, log=print) -> dict:
    """The dataset at ``data.path``, built from ``data.build`` when missing or (data.rebuild=auto) stale.

    With ``data.build`` set, the dataset's fingerprint (manifest.json ``build``:
    sha256 of the build options and the input's size/mtime) must match the
    recipe's: otherwise the run stops naming data.path and the differing
    options (data.rebuild=error, the default) or rebuilds it atomically
    (data.rebuild=auto). Without ``data.build`` the folder is used as it is.
    """
    from ..config import RecipeError
    from ..data import build as B
    from ..data import importers, synth

    root = Path(cfg.data.path)
    bc = cfg.data.build
    if bc is None:
        return B.load_manifest(root)  # raises the clear "no manifest" error when missing

    def stale(m: dict) -> list[str]:
        return B.fingerprint_diff(m, bc)

    def current() -> Optional[dict]:
        if not (root / "manifest.json").is_file():
            return None
        m = B.load_manifest(root)
        diffs = stale(m)
        if diffs and cfg.data.rebuild == "error":
            raise B.DataError(
                f"data.path {root} holds a dataset built with other options than data.build: {'; '.join(diffs)}; "
                f"set data.rebuild=auto to rebuild it, point data.path elsewhere, or remove data.build to use it as it is"
            )
        return None if diffs else m

    m = current()
    if m is not None:
        return m
    if global_rank() != 0:
        for _ in range(3600):  # rank 0 builds; the others wait (up to 1 h) for a dataset that matches
            try:
                m = B.load_manifest(root) if (root / "manifest.json").is_file() else None
            except B.DataError:  # caught inside rank 0's swap (manifest moved out for milliseconds)
                m = None
            if m is not None and not stale(m):
                return m
            time.sleep(1)
        raise TimeoutError(f"waited 1 h for rank 0 to build {root}")
    if (root / "manifest.json").is_file():
        log(f"data.rebuild=auto: rebuilding {root} ({'; '.join(stale(B.load_manifest(root)))})")
    src = bc.input
    if bc.source == "synth" and src is None:
        src = str(root / "raw")  # generated from data.build.synth, which the fingerprint covers
        log(f"generating synthetic events into {src}")
        synth.write(src, **bc.synth.model_dump())
    if src is None:
        raise RecipeError(f"data.build.input: required for source '{bc.source}'")
    imp = importers.load(bc.source, src, **bc.importer_options())
    return B.build(imp, root, bc, source={"source": bc.source, "input": src}, log=log)


def wandb_mode(mode: str, env=os.environ) -> str:
    """``logging.wandb.mode``: auto = the user's WANDB_MODE when set (offline/disabled must win over a
    key that happens to be in the environment), else online with WANDB_API_KEY, else offline."""
    if mode != "auto":
        return mode
    if env.get("WANDB_MODE") in ("online", "offline", "disabled"):
        return env["WANDB_MODE"]
    if env.get("WANDB_MODE") == "dryrun":
        return "offline"
    return "online" if env.get("WANDB_API_KEY") else "offline"


def make_loggers(cfg: Recipe, run_dir: Path, recipe_tree: dict):
    from lightning.pytorch.loggers import CSVLogger

    loggers = [CSVLogger(save_dir=str(run_dir), name="logs", version="")]
    wc = cfg.logging.wandb
    if wc.enabled and wc.mode != "disabled":
        from lightning.pytorch.loggers import WandbLogger

        mode = wandb_mode(wc.mode)
        (run_dir / "wandb").mkdir(parents=True, exist_ok=True)
        loggers.append(
            WandbLogger(
                project=wc.project, entity=wc.entity, name=run_dir.name, save_dir=str(run_dir), mode=mode,
                tags=wc.tags or None, config=redact(recipe_tree),
            )
        )
    return loggers


def make_callbacks(cfg: Recipe, run_dir: Path, has_logger: bool):
    from lightning.pytorch.callbacks import EarlyStopping, LearningRateMonitor, TQDMProgressBar

    from .checkpointing import AtomicCheckpoint, ResumeState

    from ..tasks import task_class

    tc = cfg.trainer
    ck = str(run_dir / "checkpoints")
    monitor = task_class(cfg.task[0].name).monitor(cfg.eval.ks)  # the primary task's (metric, mode), e.g. val/ndcg@10 max
    cbs = [
        ResumeState(),
        AtomicCheckpoint(
            dirpath=ck, filename="best-epoch{epoch}-step{step}", auto_insert_metric_name=False,
            monitor=monitor[0], mode=monitor[1], save_top_k=1, save_last=tc.checkpoint.save_last,
        ),
    ]
    if tc.checkpoint.every_n_steps:
        cbs.append(
            AtomicCheckpoint(
                dirpath=ck, filename="step{step}", auto_insert_metric_name=False,
                every_n_train_steps=tc.checkpoint.every_n_steps, save_top_k=tc.checkpoint.keep_last,
                monitor="step", mode="max", save_last=False,
            )
        )
    if cfg.finetune.method == "adalora":
        from .adalora import AdaLoraAllocator

        cbs.append(AdaLoraAllocator())  # rank budget schedule, once per optimizer step
    from .averaging import make_weight_averaging

    cbs += make_weight_averaging(cfg)  # validation, checkpoints and the final test see the averaged weights
    if tc.early_stopping.enabled:
        es = tc.early_stopping
        # default: the metric (and direction) the task proposes; checked after each validation only:
        # Lightning's default also checks at the end of a training epoch, which fails (metric missing)
        # when trainer.max_steps ends a run before any validation
        cbs.append(EarlyStopping(monitor=es.monitor or monitor[0], patience=es.patience, mode=es.mode or monitor[1],
                                 check_on_train_epoch_end=False))
    if has_logger:
        cbs.append(LearningRateMonitor(logging_interval="step"))
    if tc.progress_bar:
        cbs.append(TQDMProgressBar(refresh_rate=max(1, tc.log_every_n_steps // 2)))
    from .throughput import ThroughputMonitor

    cbs.append(ThroughputMonitor(peak_tflops=tc.peak_tflops, log_every_n_steps=tc.log_every_n_steps))
    return cbs


def resume_path(resume: Optional[str], run_dir: Path) -> Optional[str]:
    """``trainer.resume``: None, 'auto' (newest complete checkpoint of RUN_DIR, or a fresh start) or a path."""
    from .checkpointing import find_resume

    if not resume:
        return None
    if resume == "auto":
        found = find_resume(run_dir)
        return str(found) if found else None
    path = Path(resume)
    if not path.exists():
        raise FileNotFoundError(f"trainer.resume: checkpoint not found: {path}")
    if path.is_file():
        from .checkpointing import safe_load

        safe_load(path)  # a path from elsewhere: a crafted or foreign file fails here, in one line
    return str(path.resolve())


def eval_checkpoint(trainer, run_dir: Path, which: str) -> Optional[str]:
    """The checkpoint the final validate/test load (the resolved best or last one).

    A DeepSpeed ZeRO-3 folder cannot be loaded into DeepSpeed's inference engine (it has no
    optimizer to take the partitions), so rank 0 consolidates it into one fp32 file first and the
    strategy loads that with ``load_full_weights`` (gathering each layer into its shards).
    """
    from .checkpointing import consolidate_deepspeed, find_resume, is_deepspeed_checkpoint

    cb = trainer.checkpoint_callback
    path = Path(cb.best_model_path) if which == "best" and cb and cb.best_model_path else find_resume(run_dir)
    if path is None or not path.exists():
        return None  # nothing saved (checkpointing off): evaluate the weights in memory
    strategy = trainer.strategy
    if is_deepspeed_checkpoint(path) and getattr(strategy, "zero_stage_3", False):
        out = run_dir / "checkpoints" / f".eval-{path.name}.pt"
        if trainer.is_global_zero:
            consolidate_deepspeed(path, out)
        strategy.barrier("ecomtrain.consolidate")
        strategy.load_full_weights = True
        return str(out)
    return str(path)


def cold_report(cfg: Recipe, manifest: dict, num_items: int, log=print) -> dict:
    """Cold-item facts for metrics.json; id mode says plainly that it cannot rank cold items."""
    n_cold = int((manifest.get("cold_items") or {}).get("count", 0))
    if not n_cold:
        return {}
    finite = num_items - 1  # the target competes with every other item (seen ones excluded or not: an upper bound)
    out = {"eval/cold_items": n_cold, "eval/model_items": cfg.model.items, "eval/cold_items_rankable": cfg.model.items != "id"}
    for k in cfg.eval.ks:
        out[f"test_cold/random_hr@{k}"] = round(k / finite, 6)
    if cfg.model.items == "id":
        log(f"model.items=id cannot rank the {n_cold} cold items (their item tokens never trained): test_cold/* is at or "
            "below the random-rank expectation test_cold/random_hr@K; use model.items=text or hybrid")
    return out


def train(cfg: Recipe, log=print, callbacks: Sequence = ()) -> Path:
    """Fit, validate and test ``cfg``; returns RUN_DIR. ``callbacks``: extra Lightning callbacks
    appended after the run's own (the test suite injects faults this way)."""
    import lightning as L

    from .datamodule import ShardDataModule
    from .module import module_for_dataset
    from .strategies import build_strategy, cpu_precision_warning, resolve_accelerator

    from . import preemption

    preemption.install(cfg.trainer.preemption.signal)  # first: a signal during setup is kept, not fatal
    t0 = time.time()
    run_dir = resolve_run_dir(cfg)
    is_zero = global_rank() == 0
    ckpt = resume_path(cfg.trainer.resume, run_dir)  # a bad trainer.resume fails before anything is written
    manifest = ensure_dataset(cfg, log=log if is_zero else (lambda *_: None))
    recipe_tree = cfg.model_dump(mode="json")
    if is_zero:
        run_dir.mkdir(parents=True, exist_ok=True)
        dump_recipe(cfg, run_dir / "recipe.yaml")

    L.seed_everything(cfg.run.seed, workers=True, verbose=False)
    num_items = int(manifest["num_items"])
    module = module_for_dataset(cfg, manifest, log=log if is_zero else (lambda *_: None))
    dm = ShardDataModule(cfg, module.task, manifest)  # the task(s) checked the dataset when the module was made

    tc = cfg.trainer
    accelerator = resolve_accelerator(tc)
    slow = cpu_precision_warning(tc.precision, accelerator)
    if slow and is_zero:
        log(f"WARNING: {slow}")
    loggers = make_loggers(cfg, run_dir, recipe_tree)
    stop_on_signal = preemption.StopOnSignal(log=log)
    trainer = L.Trainer(
        accelerator=accelerator, devices=tc.devices, num_nodes=tc.num_nodes, strategy=build_strategy(tc, accelerator, cfg.data.batch_size),
        precision=tc.precision, max_epochs=tc.max_epochs, max_steps=tc.max_steps,
        accumulate_grad_batches=tc.accumulate_grad_batches, gradient_clip_val=tc.gradient_clip_val,
        check_val_every_n_epoch=tc.check_val_every_n_epoch, log_every_n_steps=tc.log_every_n_steps,
        limit_train_batches=tc.limit_train_batches, limit_val_batches=tc.limit_val_batches, limit_test_batches=tc.limit_test_batches,
        logger=loggers, callbacks=[*make_callbacks(cfg, run_dir, bool(loggers)), stop_on_signal, *callbacks],
        plugins=preemption.cluster_plugins(),
        enable_progress_bar=tc.progress_bar, enable_model_summary=is_zero, default_root_dir=str(run_dir),
        num_sanity_val_steps=0, deterministic=False,
    )
    if ckpt and is_zero:
        log(f"resuming from {ckpt}")
    # the datamodule restores the in-epoch position itself (see datamodule.py)
    warnings.filterwarnings("ignore", message=".*resuming from a checkpoint that ended before the epoch ended.*")
    from .checkpointing import is_deepspeed_checkpoint, weights_only_loads

    try:
        # DeepSpeed's engine reads its checkpoint folder with torch.load(weights_only=False): route
        # those reads through the weights-only loader too (Lightning's own file loads pass weights_only)
        with weights_only_loads(enabled=bool(ckpt) and is_deepspeed_checkpoint(Path(ckpt))):
            trainer.fit(module, datamodule=dm, ckpt_path=ckpt, weights_only=True)
    except preemption.Preempted as stop:
        # the checkpoint is written; evaluating now would overrun the time limit
        if is_zero:
            log(f"preempted at step {stop}; exit {preemption.EXIT_PREEMPTED} (resume with trainer.resume=auto)")
        raise SystemExit(preemption.EXIT_PREEMPTED) from None

    best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
    which = "best" if (tc.test_ckpt == "best" and best) else "last"
    eval_ckpt = eval_checkpoint(trainer, run_dir, which)
    metrics: dict = {}
    for res in trainer.validate(module, datamodule=dm, ckpt_path=eval_ckpt, verbose=False, weights_only=True):
        metrics.update(res)
    for res in trainer.test(module, datamodule=dm, ckpt_path=eval_ckpt, verbose=False, weights_only=True):
        metrics.update(res)
    if eval_ckpt and Path(eval_ckpt).name.startswith(".eval-") and trainer.is_global_zero:
        Path(eval_ckpt).unlink(missing_ok=True)  # the consolidated ZeRO-3 copy was only for this
    metrics = {k: float(v) for k, v in sorted(metrics.items()) if "/" in k}
    monitor = next((cb for cb in trainer.callbacks if type(cb).__name__ == "ThroughputMonitor"), None)
    if monitor is not None:
        metrics.update(monitor.summary(module))  # samples/s, tokens/s, data wait (rank 0's view)
    metrics.update(
        {
            "eval/exclude_seen": bool(cfg.eval.exclude_seen),
            "eval/num_items_ranked": num_items,
            "eval/checkpoint": which,
            "train/global_step": int(trainer.global_step),
            "train/epochs": int(trainer.current_epoch),
            "train/wall_seconds": round(time.time() - t0, 1),
        }
    )
    metrics.update(cold_report(cfg, manifest, num_items, log if trainer.is_global_zero else (lambda *_: None)))
    if trainer.is_global_zero:
        (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
        for lg in loggers:
            if type(lg).__name__ == "WandbLogger":
                lg.experiment.summary.update({k: v for k, v in metrics.items() if isinstance(v, (int, float))})
                lg.experiment.finish()  # flush now, so the RUN_DIR line below is the last one printed
        keys = [k for k in ("test/hr@10", "test/ndcg@10", "test_cold/hr@10", "test_warm/hr@10", "baseline/popularity/test/ndcg@10") if k in metrics]
        if not keys:  # another primary task: its monitored metric on test, and every baseline of it
            name = module.monitor()[0].removeprefix("val/")
            keys = [k for k in metrics if k == f"test/{name}" or (k.startswith("baseline/") and k.endswith(f"/test/{name}"))]
        if "perf/samples_per_s" in metrics:
            log(
                f"throughput (rank 0): {metrics['perf/samples_per_s']:.1f} samples/s, "
                f"{metrics.get('perf/tokens_per_s', 0.0):.0f} real tokens/s, data wait {100 * metrics['perf/data_wait_fraction']:.1f}% of step time"
                + (f", MFU {100 * metrics['perf/mfu']:.1f}%" if "perf/mfu" in metrics else "")
            )
        seen = f"  (seen items {'excluded' if cfg.eval.exclude_seen else 'included'})" if "test/ndcg@10" in keys else ""
        log("  ".join(f"{k}={metrics[k]:.4f}" for k in keys) + seen)
        log(f"run dir: {run_dir}")
    return run_dir
