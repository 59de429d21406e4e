"""Plots (matplotlib, Agg): accuracy against length per method, NIAH length x depth heatmaps, and per-head
score heatmaps. matplotlib comes with the `eval` extra; without it every plot is skipped with a one-line note."""

from __future__ import annotations

from pathlib import Path

SKIPPED = "plots skipped: matplotlib is not installed (pip install 'llmpatch[eval]')"


def available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def head_heatmap(scores: list[list[float]], path: str | Path, title: str) -> Path | None:
    """A layers x heads heatmap PNG, or None (with the note printed) without matplotlib."""
    if not available():
        print(SKIPPED)
        return None
    plt = _pyplot()
    path = Path(path)
    fig, ax = plt.subplots(figsize=(max(4, len(scores[0]) * 0.4 + 2), max(3, len(scores) * 0.22 + 1)))
    im = ax.imshow(scores, aspect="auto", cmap="viridis", vmin=0)
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_title(title)
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def accuracy_vs_length(result: dict, path: Path, model: str) -> Path:
    from .runner import summary_rows

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    rows = summary_rows(result)
    for label in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == label]
        ax.plot([r["length"] for r in mine], [r["accuracy"] for r in mine], marker="o", label=label)
    ax.set(
        xlabel="prompt length (tokens)",
        ylabel="accuracy",
        ylim=(-0.05, 1.05),
        title=f"{result['suite']}: {model}",
    )
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def niah_heatmap(result: dict, config: dict, path: Path, model: str) -> Path:
    plt = _pyplot()
    lengths, depths = result["lengths"], result["depths"]
    grid = [[next(c["accuracy"] for c in config["cells"] if c["length"] == n and c["depth"] == d) for n in lengths]
            for d in depths]  # fmt: skip
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(lengths), 1.0 + 0.5 * len(depths)))
    im = ax.imshow(grid, cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(len(lengths)), [str(n) for n in lengths])
    ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
    for y, row in enumerate(grid):
        for x, v in enumerate(row):
            ax.text(x, y, f"{v:.2f}", ha="center", va="center", fontsize=8)
    ax.set(xlabel="context length (tokens)", ylabel="needle depth", title=f"NIAH {config['label']}: {model}")
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_all(results: list[dict], out: Path, model: str) -> list[str]:
    if not available():
        print(SKIPPED)
        return []
    files = []
    for result in results:
        files.append(accuracy_vs_length(result, out / f"{result['suite']}_accuracy.png", model).name)
        if result["depths"] != [None]:
            for config in result["configs"]:
                name = f"{result['suite']}_heatmap_{config['label']}.png".replace("/", "_")
                files.append(niah_heatmap(result, config, out / name, model).name)
    return files


def accuracy_vs_kv(rows: list[dict], path: Path, title: str = "") -> Path | None:
    """kvpress's leaderboard plot: accuracy (95% interval bars) against KV saved, one line per method family and
    protocol (solid A, dashed B), dense as the ceiling. `rows` from `accuracy.summarize`."""
    if not available():
        print(SKIPPED)
        return None
    plt = _pyplot()
    groups: dict[tuple, list] = {}
    for r in rows:
        if r["label"] != "dense":
            family = r["label"].rsplit("-", 1)[0] if r["label"].rsplit("-", 1)[-1].isdigit() else r["label"]
            groups.setdefault((r["toolkit"], family, r["protocol"]), []).append(r)
    n_lines = len(groups) + 1  # and dense
    ncol = 1 + n_lines // 24
    fig, ax = plt.subplots(figsize=(10 + 2.5 * (ncol - 1), max(5.0, 0.17 * n_lines / ncol)))
    dense = [r for r in rows if r["label"] == "dense"]
    if dense:
        ax.axhline(dense[0]["accuracy"], color="black", lw=1, label=f"dense {dense[0]['accuracy']:.2f}")
    colors = {k: plt.cm.tab20(i % 20) for i, k in enumerate(sorted({(t, f) for t, f, _ in groups}))}
    for (toolkit, family, proto), rs in sorted(groups.items()):  # one colour per method; A solid, B dashed
        rs = sorted(rs, key=lambda r: r["kv_saved"])
        x = [100 * r["kv_saved"] for r in rs]
        y = [r["accuracy"] for r in rs]
        err = [[r["accuracy"] - r["ci95"][0] for r in rs], [r["ci95"][1] - r["accuracy"] for r in rs]]
        marker = "o" if toolkit == "llmpatch" else "s"
        ax.errorbar(x, y, yerr=err, marker=marker, ls="-" if proto == "A" else "--", capsize=3,
                    color=colors[(toolkit, family)], label=f"{toolkit} {family.removeprefix(toolkit + '-')} ({proto})")  # fmt: skip
    ax.set_xlabel("KV cache saved (%)")
    ax.set_ylabel("accuracy (test split)")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(title or "accuracy vs KV saved")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), ncol=ncol)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
