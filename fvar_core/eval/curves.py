"""A run's training curves (metrics.jsonl) as one PNG, for people without a tracker (`fvar plot`)."""
from __future__ import annotations

import io
import json
import math
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

from fvar_core.atomic import atomic_write_bytes
from fvar_core.errors import UserError
from fvar_core.runs import METRICS

# Shown by default when the run logged them, in this order (loss first, the learning rate last).
DEFAULT_METRICS = ("loss", "student_ce", "teacher_ce", "recon", "psnr", "vq", "acc", "tail_acc", "kd", "feat",
                   "grad_norm", "lr")


def read_curves(run_dir: Union[str, Path]) -> Dict[str, Tuple[List[int], List[float]]]:
    """{metric: (steps, values)} of every numeric field of <run>/metrics.jsonl."""
    path = Path(run_dir) / METRICS
    if not path.is_file():
        raise UserError(f"{run_dir} has no {METRICS}: not an fvar run directory (or no step logged yet)")
    curves: Dict[str, Tuple[List[int], List[float]]] = {}
    for n, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        try:
            line = json.loads(raw)
        except ValueError:
            raise UserError(f"{path}:{n}: not a JSON line") from None
        for k, v in line.items():
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                steps, values = curves.setdefault(k, ([], []))
                steps.append(int(line["step"]))
                values.append(float(v))
    return curves


def plot_run(run_dir: Union[str, Path], out: Optional[Union[str, Path]] = None,
             metrics: Optional[Sequence[str]] = None) -> Path:
    """One panel per metric against the step → a PNG (default <run>/curves.png), written atomically."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError("fvar plot needs matplotlib: pip install matplotlib (or fvar[experiments])") from None
    curves = read_curves(run_dir)
    names = list(metrics) if metrics else [m for m in DEFAULT_METRICS if m in curves]
    missing = [m for m in names if m not in curves]
    if missing:
        raise UserError(f"{run_dir}: no metric {missing[0]!r} in {METRICS} (it has {', '.join(sorted(curves))})")
    if not names:
        raise UserError(f"{run_dir}: {METRICS} holds none of {', '.join(DEFAULT_METRICS)}; name some with --metrics")
    cols = min(3, len(names))
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names):
        steps, values = curves[name]
        ax.plot(steps, values, lw=1.2)
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if name == "lr":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.suptitle(Path(run_dir).resolve().name)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    target = Path(out) if out is not None else Path(run_dir) / "curves.png"
    atomic_write_bytes(target, buf.getvalue())
    return target
