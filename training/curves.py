"""Training curves as a picture (`loss.png` beside every photo model): loss, and held-out PSNR and bpp."""
from __future__ import annotations


def save_curves(history: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    log = history.get("train", [])
    if log:
        steps = [r["step"] for r in log]
        axes[0].plot(steps, [r["loss"] for r in log], label="train loss")
        axes[0].set_yscale("log")
        axes[0].legend()
    val = history.get("val", [])
    if val:
        ax = axes[1]
        ax.plot([r["step"] for r in val], [r["val_psnr"] for r in val], "o-", label="PSNR (dB)")
        ax2 = ax.twinx()
        ax2.plot([r["step"] for r in val], [r["val_bpp"] for r in val], "s--", color="C1", label="bpp")
        ax2.set_ylabel("bits per pixel")
        ax.set_ylabel("held-out PSNR (dB)")
        ax.set_xlabel("step")
        first = history.get("val_start")
        if first and all("val_loss" in r for r in val):  # a fit from a model: the held-out gain so far
            gain = axes[0].twinx()
            gain.plot([first["step"]] + [r["step"] for r in val],
                      [0.0] + [100 * (r["val_loss"] / first["val_loss"] - 1) for r in val], "o-", color="C2",
                      label="held-out loss vs start (%)")
            gain.axhline(0.0, color="C2", lw=0.5)
            gain.set_ylabel("held-out loss vs start model (%)")
            gain.legend(loc="upper right")
    axes[0].set_xlabel("step")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
