"""Pictures of a run: the bound curve, sample membership over training, samples, and the
evolution of samples through training as a GIF.  Matplotlib with the Agg backend (no screen)."""

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib import animation  # noqa: E402


def _save(fig, path):
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def bound_curve(history, path):
    """Training loss and held-out bound (bits/seq, with standard errors) against step."""
    fig, ax = plt.subplots(figsize=(6, 3.5))
    steps = [row["step"] for row in history]
    ax.plot(steps, [-row["loss_bits"] for row in history], label="training minibatch estimate", alpha=0.6)
    ax.errorbar(steps, [row["val_elbo_bits"] for row in history], yerr=[row["val_se_bits"] for row in history],
                marker="o", ms=3, capsize=2, label="held-out bound")
    ax.set_xlabel("step")
    ax.set_ylabel("bound K (bits / sequence)")
    ax.legend()
    ax.grid(alpha=0.3)
    _save(fig, path)


def membership_curve(history, path):
    """Fractions of samples in the training set, the held-out set and neither."""
    fig, ax = plt.subplots(figsize=(6, 3.5))
    steps = [row["step"] for row in history]
    for key, label in (("frac_train", "training set"), ("frac_held_out", "held-out set"), ("frac_neither", "neither")):
        ax.plot(steps, [row[key] for row in history], marker="o", ms=3, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("fraction of samples")
    ax.set_ylim(-0.02, 1.02)
    ax.legend()
    ax.grid(alpha=0.3)
    _save(fig, path)


def sample_grid(samples, path, title="samples"):
    """One sample per row, one position per column."""
    fig, ax = plt.subplots(figsize=(max(3, samples.shape[1] * 0.18), max(2.5, samples.shape[0] * 0.09)))
    ax.imshow(samples.float().numpy(), cmap="Greys", aspect="auto", interpolation="nearest")
    ax.set_xlabel("position")
    ax.set_ylabel("sample")
    ax.set_title(title)
    _save(fig, path)


def sample_evolution_gif(snapshots, path, fps=4):
    """A GIF of the samples drawn at each evaluation during training."""
    if not snapshots:
        return
    first = snapshots[0][1]
    fig, ax = plt.subplots(figsize=(max(3, first.shape[1] * 0.18), max(2.5, first.shape[0] * 0.09)))
    image = ax.imshow(first.float().numpy(), cmap="Greys", aspect="auto", interpolation="nearest", vmin=0, vmax=1)
    ax.set_xlabel("position")
    ax.set_ylabel("sample")

    def frame(i):
        step, samples = snapshots[i]
        image.set_data(samples.float().numpy())
        ax.set_title(f"samples at step {step}")
        return (image,)

    movie = animation.FuncAnimation(fig, frame, frames=len(snapshots), blit=False)
    fig.tight_layout()
    movie.save(path, writer=animation.PillowWriter(fps=fps))
    plt.close(fig)
