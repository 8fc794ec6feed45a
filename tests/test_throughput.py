"""Throughput figures in every run (train/throughput.py): present, consistent, and data wait measured."""

import json
import time

import pytest

from conftest import tiny_recipe


def _train(tiny_dataset, tmp_path, callbacks=(), **over):
    from ecomtrain.config import validate_tree
    from ecomtrain.train.runner import train

    cfg = validate_tree(tiny_recipe(tiny_dataset, tmp_path / "run", **over))
    return train(cfg, log=lambda *_: None, callbacks=callbacks)


def test_metrics_json_has_throughput(tiny_dataset, tmp_path):
    run_dir = _train(tiny_dataset, tmp_path, trainer__max_epochs=2)
    m = json.loads((run_dir / "metrics.json").read_text())
    assert m["perf/measured_batches"] >= 1
    assert m["perf/samples_per_s"] > 0 and m["perf/tokens_per_s"] > 0
    assert 0.0 <= m["perf/data_wait_fraction"] <= 1.0
    # real tokens only: at most max_history (20) input tokens per sample, at least 1
    per_sample = m["perf/tokens_per_s"] / m["perf/samples_per_s"]
    assert 1.0 <= per_sample <= 20.0
    assert 0.0 < m["perf/token_efficiency"] <= 1.0
    assert "perf/mfu" not in m  # CPU: no meaningful peak, so no MFU figure
    # CPU seconds include every thread of the process, so they cannot be 0 for a step that trained
    assert m["perf/samples_per_cpu_s"] > 0


def test_step_figures_reach_the_loggers_at_every_write_out(tiny_dataset, tmp_path):
    """train/loss is handed to Lightning only on the steps its loggers write (RecModule._log_step):
    every written step must still carry it (the same steps as the LR monitor's rows), with the
    value of that step's loss; and the optimizer is torch's fused AdamW outside DeepSpeed."""
    import csv

    import lightning as L
    import torch

    seen = {"losses": {}}

    class Spy(L.Callback):
        def on_train_start(self, trainer, pl_module):
            seen["fused"] = trainer.optimizers[0].defaults.get("fused")

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen["losses"][trainer.global_step - 1] = float(outputs["loss"])

    run_dir = _train(tiny_dataset, tmp_path, callbacks=[Spy()], trainer__max_epochs=2, trainer__log_every_n_steps=3,
                     logging__wandb__enabled=False)
    assert seen["fused"] is True
    rows = list(csv.DictReader(open(run_dir / "logs" / "metrics.csv")))
    loss_rows = {int(r["step"]): float(r["train/loss"]) for r in rows if r.get("train/loss")}
    lr_steps = sorted({int(r["step"]) for r in rows for k, v in r.items() if k.startswith("lr-") and v})
    total = json.loads((run_dir / "metrics.json").read_text())["train/global_step"]
    assert total >= 6
    assert sorted(loss_rows) == lr_steps == [s for s in range(total) if (s + 1) % 3 == 0]
    # the throughput monitor writes its window figures straight to the loggers, at Lightning's step counter
    perf_rows = [r for r in rows if r.get("perf/samples_per_s")]
    assert perf_rows and all(float(r["perf/samples_per_s"]) > 0 and 0 <= float(r["perf/data_wait_fraction"]) <= 1 for r in perf_rows)
    assert {int(r["step"]) for r in perf_rows} <= set(range(total + 1))
    for step, value in loss_rows.items():
        assert value == pytest.approx(seen["losses"][step], rel=1e-6)
    assert torch.isfinite(torch.tensor(list(loss_rows.values()))).all()


def test_data_wait_counts_time_spent_in_the_loader(tiny_dataset, tmp_path, monkeypatch):
    """A loader that sleeps 0.15 s per batch: the monitor must account at least that much wait."""
    from ecomtrain.train import datamodule as dm_mod
    from ecomtrain.train.throughput import ThroughputMonitor

    orig = dm_mod.ShardDataModule.train_dataloader
    sleep_s = 0.15

    def slow_loader(self):
        loader = orig(self)
        ds = loader.dataset
        real_iter = type(ds).__iter__

        def slow_iter(stream):
            for b in real_iter(stream):
                time.sleep(sleep_s)
                yield b

        monkeypatch.setattr(type(ds), "__iter__", slow_iter)
        return loader

    monkeypatch.setattr(dm_mod.ShardDataModule, "train_dataloader", slow_loader)
    seen = {}
    orig_summary = ThroughputMonitor.summary

    def keep(self, pl_module=None):
        seen["total"] = dict(self.total)
        return orig_summary(self, pl_module)

    monkeypatch.setattr(ThroughputMonitor, "summary", keep)
    # prefetch off: the sleeps then lie on the training loop's path, all of them
    run_dir = _train(tiny_dataset, tmp_path, trainer__max_epochs=1, data__prefetch_batches=0)
    m = json.loads((run_dir / "metrics.json").read_text())
    tot = seen["total"]
    assert tot["batches"] >= 2
    # every measured step waited >= sleep_s in next(); sleep never returns early
    assert tot["wait"] >= sleep_s * tot["batches"] * 0.99
    assert tot["wait"] <= tot["time"] + 1e-6
    assert m["perf/data_wait_fraction"] == pytest.approx(tot["wait"] / tot["time"], rel=1e-4)


def test_peak_table():
    from ecomtrain.train.throughput import device_peak_tflops

    assert device_peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert device_peak_tflops("NVIDIA A100-SXM4-40GB") == 312.0
    assert device_peak_tflops("Some CPU") is None


def test_prefetch_keeps_order_and_propagates_errors():
    from ecomtrain.data.importers import DataError
    from ecomtrain.train.datamodule import _Prefetcher

    assert list(_Prefetcher(iter(range(100)), 2)) == list(range(100))

    def broken():
        yield 1
        raise DataError("shard x.tar: unreadable")

    got = []
    with pytest.raises(DataError, match="x.tar"):
        for v in _Prefetcher(broken(), 2):
            got.append(v)
    assert got == [1]
    # closing early stops the producer thread
    import threading

    before = {t for t in threading.enumerate() if t.name == "ecomtrain-prefetch"}
    g = _Prefetcher(iter(range(10**9)), 2)
    assert next(g) == 0
    mine = {t for t in threading.enumerate() if t.name == "ecomtrain-prefetch"} - before
    assert len(mine) == 1
    g.close()
    assert not any(t.is_alive() for t in mine)


@pytest.mark.parametrize("precision", ["32", "bf16-mixed"])
def test_optimizer_is_fused_unless_amp_clips(tiny_dataset, tmp_path, precision):
    """The fused AdamW kernel (one kernel per tensor) is used in fp32; under Lightning's AMP plugin with
    gradient clipping, which refuses optimizers that may unscale gradients themselves, the run falls
    back to the plain kernel and trains (the Beauty bf16-mixed recipes crashed on the fused one)."""
    import lightning.pytorch as L

    seen = {}

    class Probe(L.Callback):
        def on_train_start(self, trainer, pl_module):
            seen["fused"] = bool(trainer.optimizers[0].defaults.get("fused"))

    run_dir = _train(tiny_dataset, tmp_path, callbacks=[Probe()], trainer__max_steps=2, trainer__precision=precision,
                     trainer__gradient_clip_val=1.0)
    assert json.loads((run_dir / "metrics.json").read_text())["train/global_step"] == 2
    assert seen["fused"] == (precision == "32")


def test_train_loader_workers_start_from_a_fork_server(tiny_dataset, tmp_path):
    """data.num_workers > 0: worker processes come from a fork server, never from forking the
    training process (it runs threads; a fork taken while one holds an interpreter lock hung a
    ZeRO-3 rank before its first batch), and the run trains through them."""
    import lightning.pytorch as L

    seen = {}

    class Probe(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            ctx = trainer.datamodule._loader.multiprocessing_context
            seen["method"] = ctx.get_start_method() if ctx is not None else "fork"

    run_dir = _train(tiny_dataset, tmp_path, callbacks=[Probe()], trainer__max_steps=3, data__num_workers=2)
    assert json.loads((run_dir / "metrics.json").read_text())["train/global_step"] == 3
    assert seen["method"] == "forkserver"


def test_read_ahead_starts_the_next_epoch_early_in_the_same_order(tiny_dataset):
    """With in-process prefetch, the next epoch's reader starts as soon as an epoch's last batch is read
    (its shuffle-buffer fill and first collates overlap Lightning's epoch end and validation); the batches
    are exactly those of a loader that reads each epoch on demand, and a reposition discards the read-ahead."""
    import torch

    from ecomtrain.data import build
    from ecomtrain.data.stream import ShardStream
    from ecomtrain.tasks.next_item import NextItemTask
    from ecomtrain.train.datamodule import _ResumableLoader

    m = build.load_manifest(tiny_dataset)
    t = NextItemTask(m["num_items"], max_history=10)

    def loader(read_ahead: bool):
        ds = ShardStream(tiny_dataset, "train", m, t.collate_train, 8, mode="train", shuffle_buffer=20, seed=3)
        ld = _ResumableLoader(ds, num_workers=0, generator=torch.Generator().manual_seed(7))
        ld.prefetch, ld.read_ahead = 2, read_ahead
        return ld

    def epochs(ld, n):
        out = []
        for e in range(n):
            out.append([b["items"].tolist() for b in ld])
            if ld.read_ahead:  # the epoch after this one is already being read
                assert ld._ahead is not None and ld._ahead[0] == e + 1
        return out

    ahead, plain = loader(True), loader(False)
    got, want = epochs(ahead, 3), epochs(plain, 3)
    assert got == want and got[0] != got[1]
    # a reposition (a resume's seek) drops the read-ahead epoch and its thread; the order is the seeked one
    ahead.seek({"epoch": 1, "batches": 2, "seed": 3})
    plain.seek({"epoch": 1, "batches": 2, "seed": 3})
    assert ahead._ahead is None
    assert [b["items"].tolist() for b in ahead] == [b["items"].tolist() for b in plain] == want[1][2:]
    ahead.drop_ahead()
    assert not ahead._ahead and not plain._ahead


def test_no_reader_thread_outlives_a_run(tiny_dataset, tmp_path):
    """A finished run and a run that fails after an epoch end (here: in validation, after the read-ahead of
    the next epoch started) both leave no prefetch thread behind (datamodule teardown / on_exception)."""
    import threading

    import lightning as L

    def prefetchers():
        return {t for t in threading.enumerate() if t.name == "ecomtrain-prefetch" and t.is_alive()}

    before = prefetchers()
    ahead = []

    class Spy(L.Callback):
        def on_train_epoch_end(self, trainer, pl_module):  # Lightning never asks past the last batch
            ahead.append(trainer.train_dataloader._ahead[0] if trainer.train_dataloader._ahead else None)

    _train(tiny_dataset, tmp_path / "ok", callbacks=[Spy()], trainer__max_epochs=2)
    assert ahead == [1, 2]  # the next epoch was being read before this one's validation
    assert not (prefetchers() - before)

    class Boom(L.Callback):
        def on_validation_start(self, trainer, pl_module):
            if trainer.current_epoch == 0 and not trainer.sanity_checking:
                raise RuntimeError("boom in validation")

    with pytest.raises(RuntimeError, match="boom"):
        _train(tiny_dataset, tmp_path / "bad", callbacks=[Boom()], trainer__max_epochs=2)
    assert not (prefetchers() - before)
