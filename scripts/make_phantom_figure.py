#!/usr/bin/env python
"""Write docs/phantom.png: a rendered whole-spine phantom (mid-sagittal T2w, the same with the
semantic label overlay, the instance mask, a domain-randomised rendering) and axial slices
through a thoracic and a lumbar vertebra with their overlays.

Usage: python scripts/make_phantom_figure.py [--out docs/phantom.png] [--seed 0]
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def _overlay_rgba(mask: np.ndarray, colors: dict[int, str], alpha: float = 0.55) -> np.ndarray:
    from matplotlib.colors import to_rgba

    rgba = np.zeros(mask.shape + (4,), np.float32)
    for v, c in colors.items():
        m = mask == v
        if m.any():
            rgba[m] = to_rgba(c, alpha)
    return rgba


def _instance_colors(values) -> dict[int, str]:
    from spineps import labels as L

    table = {lab.value: lab.color for lab in L.instance_labels()}
    return {int(v): table.get(int(v), "#ffffff") for v in values if v}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "phantom.png")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from spineps import labels as L
    from spineps.fsutil import atomic_path
    from spineps.synth.anatomy import PhantomSpec, make_phantom
    from spineps.synth.render import render_t2w

    t0 = time.perf_counter()
    spec = PhantomSpec(seed=args.seed, fov="whole", spacing=(0.9, 0.9, 2.0), orientation=("P", "I", "R"))
    ph = make_phantom(spec)
    img = render_t2w(ph, seed=args.seed)
    rnd = render_t2w(ph, seed=args.seed + 1, randomize=True)
    logging.info("phantom + 2 renderings in %.1f s", time.perf_counter() - t0)
    sem = ph.semantic_split().data
    ins = ph.instance.data
    im = img.data
    sem_colors = {lab.value: lab.color for lab in L.SEMANTIC}
    mid = im.shape[2] // 2
    inv = np.linalg.inv(img.affine)

    def vox_of(name: str) -> np.ndarray:
        w = np.array(ph.meta["body_centres_world"][name] + [1.0])
        return np.rint(inv @ w)[:3].astype(int)

    ax_levels = ["T7", "L3"]
    vmax = float(np.percentile(im, 99.5))
    fig = plt.figure(figsize=(16, 11), facecolor="black")
    gs = fig.add_gridspec(2, 6, height_ratios=[1, 1], width_ratios=[1, 1, 1, 1, 1.1, 1.1])
    sag = [
        ("T2w (mid-sagittal)", im[:, :, mid].T, None, "gray", vmax),
        ("semantic labels", im[:, :, mid].T, _overlay_rgba(sem[:, :, mid].T, sem_colors), "gray", vmax),
        ("instances", im[:, :, mid].T, _overlay_rgba(ins[:, :, mid].T, _instance_colors(np.unique(ins))), "gray", vmax),
        ("domain-randomised", rnd.data[:, :, mid].T, None, "gray", float(np.percentile(rnd.data, 99.5))),
    ]
    sp = img.spacing
    for k, (title, base, ov, cmap, vm) in enumerate(sag):
        ax = fig.add_subplot(gs[:, k])
        ax.imshow(base, cmap=cmap, vmin=0, vmax=vm, aspect=sp[1] / sp[0], interpolation="nearest")
        if ov is not None:
            ax.imshow(ov, aspect=sp[1] / sp[0], interpolation="nearest")
        ax.set_title(title, color="white", fontsize=11)
        ax.set_xlabel("anterior  <->  posterior", color="white", fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    for r, name in enumerate(ax_levels):
        j = int(np.clip(vox_of(name)[1], 0, im.shape[1] - 1))
        # axial slice (P, R) -> rows anterior..posterior; columns flipped: patient right on the left
        base = im[:, j, :][:, ::-1]
        s_ax = sem[:, j, :][:, ::-1]
        for c, with_ov in enumerate((False, True)):
            ax = fig.add_subplot(gs[r, 4 + c])
            ax.imshow(base, cmap="gray", vmin=0, vmax=vmax, aspect=sp[0] / sp[2], interpolation="nearest")
            if with_ov:
                ax.imshow(_overlay_rgba(s_ax, sem_colors), aspect=sp[0] / sp[2], interpolation="nearest")
            ax.set_title(f"axial at {name} body centre" + (" + labels" if with_ov else ""), color="white", fontsize=9)
            ax.set_xlabel("patient R  <->  L", color="white", fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
    present = sorted(v for v in np.unique(sem) if v)
    handles = [plt.Rectangle((0, 0), 1, 1, color=sem_colors[v]) for v in present]
    fig.legend(handles, [f"{v} {L.SEMANTIC_BY_VALUE[v].abbreviation}" for v in present], loc="lower center",
               ncol=len(present), fontsize=8, facecolor="black", labelcolor="white", frameon=False)
    fig.suptitle(f"spineps.synth phantom (seed {args.seed}, whole spine, {sp[0]:.1f} x {sp[1]:.1f} x {sp[2]:.1f} mm, "
                 f"P-I-R)", color="white")
    fig.tight_layout(rect=(0, 0.04, 1, 0.97))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(args.out) as tmp:
        fig.savefig(tmp, dpi=60, facecolor="black", format="png")
    logging.info("wrote %s", args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
