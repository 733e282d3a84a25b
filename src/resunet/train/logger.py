"""Run folder logging: ``metrics.csv`` (one row per epoch) and ``curves.png``."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

from resunet.data.io import atomic_write


class RunLogger:
    """Keeps the per-epoch rows and rewrites ``metrics.csv`` / ``curves.png`` atomically."""

    def __init__(self, run_dir: Path, class_names: list[str], enabled: bool = True) -> None:
        self.run_dir = Path(run_dir)
        self.class_names = class_names
        self.enabled = enabled
        self.rows: list[dict[str, Any]] = []
        self.columns = (
            ["epoch", "stage", "train_loss", "val_loss", "val_dice_mean"]
            + [f"val_dice_{n}" for n in class_names]
            + ["lr", "seconds", "data_wait"]
        )

    def restore(self, rows: list[dict[str, Any]]) -> None:
        """Continue a resumed run with the rows stored in its checkpoint."""
        self.rows = [dict(r) for r in rows]

    def log_epoch(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        if self.enabled:
            self._write_csv()
            self._write_curves()

    def _write_csv(self) -> None:
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=self.columns, extrasaction="ignore")
        writer.writeheader()
        for row in self.rows:
            writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in self.columns})
        with atomic_write(self.run_dir / "metrics.csv") as tmp:
            Path(tmp).write_text(buf.getvalue())

    def _write_curves(self) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        epochs = [r["epoch"] for r in self.rows]
        fig, (ax_loss, ax_dice) = plt.subplots(1, 2, figsize=(10, 4))
        ax_loss.plot(epochs, [r["train_loss"] for r in self.rows], label="train loss")
        val = [(r["epoch"], r["val_loss"]) for r in self.rows if r.get("val_loss") is not None]
        if val:
            ax_loss.plot(*zip(*val), "o-", label="val loss")
        ax_loss.set_xlabel("epoch")
        ax_loss.set_ylabel("Dice + Focal loss")
        ax_loss.set_yscale("log")
        ax_loss.legend()
        for name in self.class_names:
            pts = [(r["epoch"], r[f"val_dice_{name}"]) for r in self.rows if r.get(f"val_dice_{name}") is not None]
            if pts:
                ax_dice.plot(*zip(*pts), "o-", label=name)
        ax_dice.set_xlabel("epoch")
        if ax_dice.get_lines():
            ax_dice.set_ylabel("validation Dice")
            ax_dice.legend()
        else:  # a run without validation cases (or none validated yet): its LR schedule instead
            ax_dice.plot(epochs, [r["lr"] for r in self.rows], label="learning rate")
            ax_dice.set_ylabel("learning rate at the end of the epoch")
            ax_dice.set_title("no validation yet", fontsize=9)
        ax_dice.grid(alpha=0.3)
        fig.tight_layout()
        with atomic_write(self.run_dir / "curves.png") as tmp:
            fig.savefig(tmp, format="png", dpi=100)
        plt.close(fig)
