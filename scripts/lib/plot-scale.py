#!/usr/bin/env python3
"""Plots of the scale benchmark (scripts/bench-scale.sh): python3 plot-scale.py RESULTS.tsv OUTDIR

Reads the results table (one row per repository and store; `axes` says which axes a row belongs
to: chunks, hosts, gens, or restic) and writes
  OUTDIR/scale-chunks.png   every metric against the chunk count (rows on the chunk axis), one
                            line per store (local, s3); restic as single points at its blob count
  OUTDIR/scale-hosts.png    every metric against the host count (rows on the host axis)
Log-log axes; a metric without any number ("n/a": e.g. index bytes from a build that does not
print them) gets an empty panel saying so. Needs matplotlib only.
"""

import csv
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

# (column, panel title, scale factor, unit)
METRICS = [
    ("mount_start_s", "mount start (until ls shows hosts)", 1, "s"),
    ("ls_gen_s", "first ls of a cold generation", 1, "s"),
    ("first_read_s", "first read of a file, cold generation", 1, "s"),
    ("daemon_rss_kb", "mount daemon peak RSS after 1000 reads", 1e-3, "MB"),
    ("ingest_s", "ingest of one new file: wall", 1, "s"),
    ("ingest_rss_kb", "ingest of one new file: peak RSS", 1e-3, "MB"),
    ("ingest_index_bytes", "index bytes fetched per ingest", 1, "bytes"),
    ("mount_index_bytes", "index bytes fetched by the mount", 1, "bytes"),
]
STYLE = {
    "local": dict(color="tab:blue", marker="o"),
    "s3": dict(color="tab:orange", marker="s"),
    "restic": dict(color="tab:green", marker="^", linestyle="none", markersize=9),
}


def num(v):
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def plot(rows, axis, xcol, xlabel, title, path, with_restic):
    on_axis = [r for r in rows if axis in r["axes"].split(",")]
    if not on_axis:
        return False
    stores = sorted({r["store"] for r in on_axis})
    extra = [r for r in rows if r["store"] == "restic"] if with_restic else []
    fig, axs = plt.subplots(2, 4, figsize=(18, 8.5))
    for ax, (col, name, scale, unit) in zip(axs.flat, METRICS):
        drawn = False
        for store in stores:
            pts = sorted(
                (num(r[xcol]), num(r[col]) * scale)
                for r in on_axis
                if r["store"] == store and num(r[xcol]) and num(r[col]) is not None
            )
            pts = [(x, y) for x, y in pts if y > 0]
            if pts:
                ax.plot(*zip(*pts), label=store, **STYLE.get(store, {}))
                drawn = True
        for r in extra:
            x, y = num(r[xcol]), num(r[col])
            if x and y:
                ax.plot([x], [y * scale], label="restic", **STYLE["restic"])
                drawn = True
        ax.set_title(name, fontsize=10)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(unit)
        if drawn:
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "n/a (not reported)", ha="center", va="center", transform=ax.transAxes)
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    print(f"plot-scale: wrote {path}", file=sys.stderr)
    return True


def main():
    if len(sys.argv) != 3:
        sys.exit("usage: plot-scale.py RESULTS.tsv OUTDIR")
    with open(sys.argv[1], newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    out = sys.argv[2]
    shape = {
        (r["hosts"], r["gens"]) for r in rows if "chunks" in r["axes"].split(",")
    }
    shape = ", ".join(f"{h} host(s) × {g} generation(s)" for h, g in sorted(shape))
    plot(
        rows,
        "chunks",
        "chunks",
        "chunks",
        f"backtree scale: against the chunk count ({shape}); restic: one repository of tiny files",
        os.path.join(out, "scale-chunks.png"),
        True,
    )
    fixed = sorted({r["chunks"] for r in rows if "hosts" in r["axes"].split(",")})
    plot(
        rows,
        "hosts",
        "hosts",
        "hosts",
        f"backtree scale: against the host count ({', '.join(fixed)} chunks)",
        os.path.join(out, "scale-hosts.png"),
        False,
    )


if __name__ == "__main__":
    main()
