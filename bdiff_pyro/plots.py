"""Pictures of a run: the bound curve, sample membership over training, samples, and the
evolution of samples through training as a GIF, and 8x8 images (the digits) tiled into one
picture.  Matplotlib with the Agg backend (no screen)."""

from typing import Optional

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib import animation  # noqa: E402
from matplotlib.colors import ListedColormap  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from bdiff_pyro.data.digits import SIDE  # noqa: E402


def _save(fig, path):
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def bound_curve(history, path, references=None, selected_step=None):
    """Training loss and held-out bound (bits/seq, with standard errors) against step, a
    horizontal line for each known reference (``{label: bits}``, e.g. the data's own
    log-likelihood and the oracle's ELBO), and a vertical line at the selected step."""
    fig, ax = plt.subplots(figsize=(7, 4))
    steps = [row["step"] for row in history]
    ax.plot(steps, [-row["loss_bits"] for row in history], label="training minibatch estimate", alpha=0.6)
    ax.errorbar(steps, [row["val_elbo_bits"] for row in history], yerr=[row["val_se_bits"] for row in history],
                marker="o", ms=3, capsize=2, label="held-out bound")
    for (label, bits), style in zip((references or {}).items(), (":", "--", "-.")):
        ax.axhline(bits, color="0.25", ls=style, lw=1, label=f"{label}: {bits:.3f}")
    if selected_step is not None:
        ax.axvline(selected_step, color="C3", lw=1, alpha=0.6, label=f"selected (best held-out): step {selected_step}")
    ax.set_xlabel("step")
    ax.set_ylabel("ELBO (bits / sequence)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    _save(fig, path)


def marginals_and_correlations(samples, data, path, data_label="test data"):
    """Two scatter plots against the diagonal: the mean of every position in the samples
    against the data (for bits, P(x_i = 1)), and the correlation of every pair of positions
    i < j (pairs where either set has a constant position are left out).  A model that gets
    the marginals right but ignores the dependencies shows its correlations on the horizontal
    axis of the second panel."""
    samples, data = samples.double(), data.double()
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 4.2))
    _against_diagonal(left, data.mean(0).numpy(), samples.mean(0).numpy())
    left.set_title(f"per-position mean ({samples.shape[1]} positions)")
    left.set_xlabel(f"{data_label} ({len(data)} rows)")
    left.set_ylabel(f"samples ({len(samples)})")
    data_corr, sample_corr = _correlations(data), _correlations(samples)
    i, j = np.triu_indices(data.shape[1], k=1)
    pairs = np.isfinite(data_corr[i, j]) & np.isfinite(sample_corr[i, j])
    _against_diagonal(right, data_corr[i, j][pairs], sample_corr[i, j][pairs], size=2)
    right.set_title(f"pairwise correlation ({int(pairs.sum())} pairs)")
    right.set_xlabel(data_label)
    right.set_ylabel("samples")
    _save(fig, path)


def _correlations(x):
    """Pearson correlations of the columns of x (rows, n); NaN where a column is constant."""
    centred = (x - x.mean(0)).numpy()
    scale = np.sqrt((centred ** 2).sum(0))
    with np.errstate(invalid="ignore", divide="ignore"):
        return (centred.T @ centred) / np.outer(scale, scale)


def _against_diagonal(ax, x, y, size=8):
    low, high = float(min(x.min(initial=0), y.min(initial=0))), float(max(x.max(initial=1), y.max(initial=1)))
    ax.plot([low, high], [low, high], color="0.4", lw=1, ls="--", label="y = x")
    ax.scatter(x, y, s=size, alpha=0.5)
    ax.set_aspect("equal", adjustable="box")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")


def membership_curve(history, path, held_out=True):
    """Fractions of samples in the training set, the held-out set and neither; without
    ``held_out`` (no held-out sequence that is not a training one) the held-out line is left
    out and the plot says so.  The legend sits beside the axes, where it hides no line."""
    fig, ax = plt.subplots(figsize=(7, 3.5))
    steps = [row["step"] for row in history]
    keys = [("frac_train", "training set"), ("frac_held_out", "held-out set"), ("frac_neither", "neither")]
    for colour, (key, label) in zip(("C0", "C1", "C2"), keys):
        if key == "frac_held_out" and not held_out:
            ax.plot([], [], color="none", label="(no held-out patterns:\nheld-out set = training set)")
            continue
        ax.plot(steps, [row[key] for row in history], marker="o", ms=3, color=colour, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("fraction of samples")
    ax.set_ylim(-0.02, 1.02)
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0, fontsize=9)
    ax.grid(alpha=0.3)
    _save(fig, path)


def _show_states(fig, ax, samples, levels):
    """imshow of state codes, one grey per state (white = 0, black = the top state), with a key."""
    levels = max(levels, int(samples.max()) + 1)
    image = ax.imshow(samples.float().numpy(), cmap=plt.get_cmap("Greys", levels), vmin=-0.5, vmax=levels - 0.5,
                      aspect="auto", interpolation="nearest")
    key = fig.colorbar(image, ax=ax, ticks=range(levels), fraction=0.08, pad=0.03, shrink=min(1.0, 0.12 * levels + 0.1))
    key.set_label("value (black = 1)" if levels == 2 else "state")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("position")
    ax.set_ylabel("sample")
    return image


def _grid_size(samples):
    return max(3.5, samples.shape[1] * 0.18 + 1.2), max(2.8, samples.shape[0] * 0.09 + 0.6)


def sample_grid(samples, path, title="samples", levels=2):
    """One sample per row, one position per column."""
    fig, ax = plt.subplots(figsize=_grid_size(samples))
    _show_states(fig, ax, samples, levels)
    ax.set_title(title)
    _save(fig, path)


def sample_evolution_gif(snapshots, path, fps=4, levels=2):
    """A GIF of the samples drawn at each evaluation during training."""
    if not snapshots:
        return
    first = snapshots[0][1]
    levels = max([levels] + [int(samples.max()) + 1 for _, samples in snapshots])
    fig, ax = plt.subplots(figsize=_grid_size(first))
    image = _show_states(fig, ax, first, levels)
    # the layout is fixed before the first frame: a title must be in place to get its room
    title = ax.set_title(f"samples at step {snapshots[-1][0]}")

    def frame(i):
        step, samples = snapshots[i]
        image.set_data(samples.float().numpy())
        title.set_text(f"samples at step {step}")
        return (image,)

    fig.tight_layout()
    movie = animation.FuncAnimation(fig, frame, frames=len(snapshots), blit=False)
    movie.save(path, writer=animation.PillowWriter(fps=fps))
    plt.close(fig)


def image_grid(images, columns: int = 8, pad: int = 1) -> np.ndarray:
    """(num, 64) images -> one 2-D array of them tiled ``columns`` wide, ``pad`` pixels apart
    (padding is -1 so it can be drawn in a separate colour)."""
    images = np.asarray(images, dtype=np.float64).reshape(-1, SIDE, SIDE)
    rows = -(-len(images) // columns)
    cell = SIDE + pad
    grid = np.full((rows * cell + pad, columns * cell + pad), -1.0)
    for k, image in enumerate(images):
        r, c = divmod(k, columns)
        grid[pad + r * cell: pad + r * cell + SIDE, pad + c * cell: pad + c * cell + SIDE] = image
    return grid


def save_image_grid(images, path, columns: int = 8, title: Optional[str] = None) -> None:
    """Draw ``images`` (num, 64) as 8x8 tiles, black = 1, and save to ``path`` (PNG)."""
    grid = np.ma.masked_less(image_grid(images, columns), 0)
    cmap = ListedColormap(["white", "black"]) if np.isin(grid.compressed(), (0, 1)).all() else plt.get_cmap("Greys")
    cmap = cmap.copy()
    cmap.set_bad("#b0c4de")
    fig, ax = plt.subplots(figsize=(0.5 * columns + 0.4, 0.5 * (grid.shape[0] / (SIDE + 1)) + 0.6))
    ax.imshow(grid, cmap=cmap, interpolation="nearest", vmin=0, vmax=1)
    ax.set_axis_off()
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
