"""What a run reports and keeps, as callbacks of the round loop: TensorBoard (scalars, the per-client figure, the
HParams view), checkpoints, the progress display. The orchestrator calls every hook by name on every callback that
has it (Fabric's callback convention, ``fabric.call``); the simulation's ``fit`` loop and Flower's ServerApp
(:mod:`fedlit.integrations.flower`) go through the same orchestrator methods (``open_run``, ``log_round``,
``record_evaluation``, ``finish``), so both write the same logs. A researcher's own callback (``callbacks=[...]``
of :class:`~fedlit.orchestrator.Orchestrator`) sees the same hooks:

``on_run_open(orch, run_dir, start)`` · ``on_fit_start(orch, start)`` · ``on_scalars(orch, scalars, step)`` ·
``on_evaluation(orch, per_client, step)`` · ``on_round_end(orch, rnd, metrics, loss)`` · ``on_fit_end(orch)`` ·
``on_finish(orch, results)``. Only rank 0 writes.
"""

from __future__ import annotations

from pathlib import Path

from .errors import FedlitError

FINAL = "final/"  # prefix of the final-metric tags of the HParams view


class TensorBoard:
    """Scalars, the ``eval/per_client_accuracy`` figure and the HParams view, under ``<run_dir>/tensorboard``."""

    def __init__(self):
        self.logger = None

    def on_run_open(self, orch, run_dir: Path, start: int) -> None:
        from lightning.fabric.loggers import TensorBoardLogger

        if orch.fabric.global_rank == 0:  # purge_step drops scalars a killed run logged after its last checkpoint
            self.logger = TensorBoardLogger(root_dir=str(run_dir), name="tensorboard", version="",
                                            default_hp_metric=False, purge_step=start + 1 if start else None)

    def on_scalars(self, orch, scalars: dict, step: int) -> None:
        if self.logger is not None:
            self.logger.log_metrics(scalars, step=step)

    def on_evaluation(self, orch, per_client: dict, step: int) -> None:
        """Image summary ``eval/per_client_accuracy``: Local/Base/Novel bars per client (rank 0, Agg canvas)."""
        from .figures import per_client_figure

        if self.logger is None:
            return
        try:
            fig = per_client_figure(per_client, f"{orch.method.name}, round {step}", names=orch.client_groups())
        except FedlitError:  # matplotlib missing: scalars only
            return
        self.logger.experiment.add_figure("eval/per_client_accuracy", fig, global_step=step, close=True)

    def flush(self) -> None:
        if self.logger is not None:
            self.logger.experiment.flush()  # scalars up to this round are on disk before the checkpoint is

    def on_finish(self, orch, results: dict) -> None:
        if self.logger is None:
            return
        if not _final_logged(orch.run_dir / "tensorboard"):  # a resumed run that crashed after logging them
            self.logger.log_hyperparams(orch.hparams(), metrics={f"{FINAL}{k}": v for k, v in results["final"].items()})
        self.logger.finalize("success")


class Checkpoints:
    """``<run_dir>/checkpoint.safetensors`` after every ``trainer.checkpoint_every`` rounds (and the last), written
    atomically by rank 0 once the TensorBoard scalars of the round are on disk."""

    def on_round_end(self, orch, rnd: int, metrics: dict, loss) -> None:
        if orch.protocol.checkpoint_due(rnd):
            orch.save_checkpoint(rnd + 1, metrics)  # flushes the TensorBoard scalars first (rank 0 writes)


class ProgressDisplay:
    """The progress bar / lines (:class:`fedlit.progress.Progress`, ``trainer.progress``), rank 0 only."""

    def __init__(self):
        self.progress = None

    def on_fit_start(self, orch, start: int) -> None:
        from .progress import Progress

        self.progress = Progress(orch.method.name, orch.protocol.rounds, start, orch.cfg.progress,
                                 enabled=orch.fabric.global_rank == 0)

    def on_round_end(self, orch, rnd: int, metrics: dict, loss) -> None:
        self.progress.round_done(rnd, metrics, loss)

    def on_fit_end(self, orch) -> None:
        self.progress.close()


def default_callbacks() -> list:
    """The callbacks of every run, in call order."""
    return [TensorBoard(), Checkpoints(), ProgressDisplay()]


def _final_logged(tb_dir: Path) -> bool:
    """The run's TensorBoard files already hold the final metrics (tag names are stored verbatim)."""
    needle = FINAL.encode()
    for path in sorted(tb_dir.glob("events.out.tfevents.*")):
        try:
            if needle in path.read_bytes():
                return True
        except OSError:
            pass
    return False


__all__ = ["Checkpoints", "FINAL", "ProgressDisplay", "TensorBoard", "default_callbacks"]
