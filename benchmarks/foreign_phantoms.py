"""A second, independently written synthetic abdominal CT generator (a yardstick foreign to the training data).

Every case is built on an internal grid ``[d, h, w]`` (d: inferior->superior, h: anterior->posterior, w: patient
right->left) in physical millimetres, with the anatomy placed in RAS+ terms (+X = patient Left->Right i.e. the
liver sits at X > 0, +Y = anterior, +Z = superior).  The arrays are then re-ordered / flipped into a seed-chosen,
never-RAS storage order (half the cases LPS-style: i->L, j->P, k->S) and written with the affine that truthfully
maps the stored indices to RAS+ mm.  Labels: 0 background, 1 liver, 2 liver lesion.

    python benchmarks/foreign_phantoms.py OUT_DIR --n 8 --seed 100 [--shape 40 256 256]
"""
from __future__ import annotations

import argparse
import itertools
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel import orientations as nio
from scipy import ndimage as ndi

INTERNAL_AXCODES = ("S", "P", "L")  # what the internal [d, h, w] grid points to
_ORDERS = [
    tuple(c[i] for i in perm) for perm in itertools.permutations(range(3))
    for c in itertools.product("LR", "PA", "SI")
]
_ORDERS = [o for o in _ORDERS if o != ("R", "A", "S")]


def _field(rng, shape, coarse):
    """Smooth, unit-std random field: coarse white noise spread by separable Gaussian kernels."""
    g = rng.standard_normal(coarse)
    for ax, (size, c) in enumerate(zip(shape, coarse)):
        k = np.exp(-0.5 * ((np.linspace(0, c - 1, size)[:, None] - np.arange(c)[None]) / 0.7) ** 2)
        g = np.moveaxis(np.tensordot(k / k.sum(1, keepdims=True), np.moveaxis(g, ax, 0), axes=1), 0, ax)
    return (g - g.mean()) / (g.std() + 1e-6)


def _quadric(X, Y, Z, c, r, angle=0.0, p=2.0):
    """Implicit value of a superellipsoid (< 1 inside), rotated by ``angle`` (rad) in the axial plane."""
    dx, dy, dz = X - c[0], Y - c[1], Z - c[2]
    u, v = np.cos(angle) * dx + np.sin(angle) * dy, -np.sin(angle) * dx + np.cos(angle) * dy
    return np.abs(u / r[0]) ** p + np.abs(v / r[1]) ** p + np.abs(dz / r[2]) ** p


def make_foreign_case(seed: int, shape=(40, 256, 256), orientation=None):
    """One synthetic case: (int16 HU, uint8 labels, 4x4 voxel->RAS affine), arrays in their stored order.

    ``shape`` is the internal axial grid ``(D, H, W)`` (slices, rows, columns); the stored arrays are a
    permutation/flip of it given by ``orientation`` (3 axis codes, default chosen by the seed)."""
    rng = np.random.default_rng(seed)
    U = rng.uniform
    D, H, W = shape
    # ---- geometry: body size first, pixel spacing large enough that the body (mostly) fits the FOV
    a = U(115, 175)                                   # body half-width (mm)
    b = a * U(0.62, 0.80)                             # body half-depth (mm)
    lo = max(0.6, 2.1 * a / W)                    # FOV >= 1.05 x body width
    sx = sy = U(lo, max(lo, 1.6))
    sz = U(2.5, 5.0)
    cw, ch = (W - 1) / 2 + U(-0.04, 0.04) * W, (H - 1) / 2 - U(0.0, 0.06) * H
    X = ((cw - np.arange(W)) * sx)[None, None, :]     # + = patient right
    Y = ((ch - np.arange(H)) * sy)[None, :, None]     # + = anterior
    Z = (np.arange(D) * sz)[:, None, None]            # + = superior
    z_top = (D - 1) * sz
    zt = z_top + U(0, 20)                             # liver dome at or just above the top slice
    zb = zt - U(120, 175)                             # liver tip
    f_lo, f_mid = _field(rng, shape, (4, 6, 6)), _field(rng, shape, (8, 14, 14))

    # ---- body outline, subcutaneous fat, muscle wall (true in-plane depth from the skin)
    n = U(2.0, 2.8)
    az = a * (1 + 0.03 * np.sin(Z / 60.0 + U(0, 6)))
    by = np.where(Y > 0, b, 0.9 * b)
    body = (np.abs(X / az) ** n + np.abs(Y / by) ** n) < 1
    pad = ((0, 0), (8, 8), (8, 8))                    # edge padding: a FOV-cut body is not skin at the cut
    depth = ndi.distance_transform_edt(np.pad(body, pad, "edge"), sampling=(1e4, sy, sx))[:, 8:-8, 8:-8]
    tf, tm = U(8, 35), U(6, 14)
    tf_map = tf * (1 + 0.2 * f_lo)
    fat_sc = body & (depth < tf_map)
    wall = body & ~fat_sc & (depth < tf_map + tm)
    inner = body & (depth >= tf_map + tm)
    ai, bi = a - tf - tm, b - tf - tm

    # ---- spine, aorta, IVC, paraspinal / psoas muscles
    rv = U(16, 22)
    yv = -0.9 * b + 0.7 * tf + U(55, 70)
    r_v = np.hypot(X, Y - yv)
    disc = ((Z + U(0, 30)) % U(28, 34)) < U(6, 9)
    vb = (r_v < rv) & ~disc
    vb_cortex = vb & (r_v > rv - U(1.5, 2.5))
    discs = (r_v < rv) & disc
    canal = np.hypot(X, Y - (yv - rv - 9)) < 8
    post = (((np.abs(X) < 4) & (Y < yv - rv - 12) & (Y > yv - rv - 45))
            | ((np.abs(X) < U(28, 38)) & (np.abs(Y - (yv - rv - 10)) < 4))
            | ((np.abs(np.abs(X) - 10) < 4) & (Y < yv - rv - 4) & (Y > yv - rv - 18))) & ~canal
    post = post & body & ~vb
    paraspinal = body & (((np.abs(X) - 28) / U(22, 30)) ** 2 + ((Y - (yv - rv - 28)) / U(14, 19)) ** 2 < 1)
    psoas_r = np.clip((zt - 95 - Z) / 5.0, 0, U(12, 18))
    psoas = (np.hypot(np.abs(X) - rv - 12, Y - yv) < psoas_r) & inner
    aorta_hu = U(40, 350)
    aorta = np.hypot(X + rv * 0.6 + U(0, 6), Y - (yv + rv + U(8, 14))) < U(9, 13)
    ivc = ((X - rv * 0.5 - U(12, 20)) / 13) ** 2 + ((Y - yv - rv - U(12, 18)) / 9) ** 2 < 1
    full = lambda m: np.broadcast_to(m, shape)  # noqa: E731  (Z-independent masks -> full grid)
    canal, post, paraspinal, aorta, ivc = map(full, (canal, post, paraspinal, aorta, ivc))
    bone_any = vb | post | discs | canal

    # ---- organs placed relative to the liver dome, not to the volume
    kid_r = _quadric(X, Y, Z, (U(45, 60), yv - U(0, 10), zt - U(115, 135)), (U(25, 32), U(20, 26), U(45, 55)), 0.5)
    kid_l = _quadric(X, Y, Z, (-U(45, 60), yv - U(0, 10), zt - U(100, 120)), (U(25, 32), U(20, 26), U(45, 55)), -0.5)
    kidney = ((kid_r < 1) | (kid_l < 1)) & inner & ~psoas
    k_sinus = ((kid_r < 0.3) | (kid_l < 0.3)) & kidney
    spl = _quadric(X, Y, Z, (-U(0.55, 0.7) * ai, -U(0.15, 0.35) * bi, zt - U(35, 60)),
                   (U(45, 60), U(18, 28), U(45, 60)), U(2.2, 2.6), 2.2)
    sto_c, sto_r = (-U(0.25, 0.4) * ai, U(0.1, 0.3) * bi, zt - U(30, 55)), (U(35, 50), U(25, 40), U(35, 50))
    sto_f = _quadric(X, Y, Z, sto_c, sto_r, U(-0.4, 0.4))
    stomach = (sto_f < 1) & inner & ~bone_any
    sto_lumen = (sto_f < 0.8) & stomach
    sto_gas = sto_lumen & (Y > sto_c[1] + sto_r[1] * U(0.1, 0.5))       # supine: gas floats anteriorly
    gb_c = (U(0.15, 0.3) * ai, U(0.1, 0.3) * bi, zb + U(25, 45))           # gallbladder (not liver)
    gb = _quadric(X, Y, Z, gb_c, (U(12, 18), U(12, 18), U(25, 40))) < 1

    # ---- liver: tapered superquadric column + smooth random deformation, cut by an oblique plane
    t = (Z - zb) / (zt - zb)
    tpk = U(0.55, 0.7)
    prof = np.where(t > tpk, np.sqrt(np.clip(1 - ((t - tpk) / (1 - tpk)) ** 2, 0, 1)), np.clip(t / tpk, 0, 1) ** 0.6)
    prof = np.where((t < 0) | (t > 1), 0.0, prof) + 1e-6
    xc = U(0.35, 0.5) * ai + (1 - t) * 0.2 * ai
    yc = U(-0.05, 0.1) * bi - (1 - t) * 0.2 * bi
    pl = U(2.2, 3.5)
    lf = (np.abs((X - xc) / (U(0.6, 0.75) * ai * prof)) ** pl + np.abs((Y - yc) / (U(0.7, 0.85) * bi * prof)) ** pl
          + 0.2 * f_mid)
    k_cut, x_cut = U(-0.9, -0.3), -U(0.05, 0.25) * ai
    liver = (lf < 1) & ((X - x_cut - k_cut * Y) > 0) & inner
    liver &= ~(bone_any | aorta | ivc | kidney | stomach | gb | psoas | paraspinal | (spl < 1))
    spleen = (spl < 1) & inner & ~liver & ~kidney & ~stomach & ~bone_any
    organs = liver | spleen | kidney | stomach | gb | aorta | ivc | bone_any | psoas | paraspinal

    # ---- HU painting
    liv_hu = U(40, 130)
    hu = np.full(shape, -1000.0)
    hu[body] = U(-115, -85) + 8 * f_mid[body]
    hu[wall] = U(35, 60)
    hu[inner] = U(-100, -70) + 10 * f_lo[inner]
    f_b, f_g = _field(rng, shape, (10, 20, 20)), _field(rng, shape, (12, 28, 28))
    bowel = inner & ~organs & (Z < zt - U(50, 70)) & (f_b > 0.4)
    hu[bowel] = U(10, 40)
    hu[bowel & (f_g > 1.3)] = -900
    lung = inner & ~organs & (Z > zt - U(15, 35)) & (depth < tf_map + tm + 40)
    hu[lung] = -850 + 30 * f_mid[lung]
    hu[paraspinal | psoas] = U(40, 60)
    hu[kidney] = liv_hu + U(-5, 60)
    hu[k_sinus] = U(-60, 20)
    hu[spleen] = liv_hu + U(-20, 20) + 4 * f_mid[spleen]
    hu[stomach] = liv_hu + U(-25, 10)
    hu[sto_lumen] = U(0, 25)
    hu[sto_gas] = -950
    hu[gb & inner] = U(0, 20)
    hu[liver] = liv_hu + 5 * f_lo[liver]
    v1, v2 = _field(rng, shape, (10, 22, 22)), _field(rng, shape, (10, 22, 22))
    vessels = liver & (np.abs(v1) < 0.12) & (np.abs(v2) < 0.25)      # intersection of two thin sheets = tubes
    hu[vessels] = liv_hu + (U(20, 60) if aorta_hu > 150 else U(-20, -5))
    hu[aorta & body] = aorta_hu
    hu[ivc & body] = liv_hu + U(-15, 40)
    lab = liver.astype(np.uint8)

    # ---- lesions (0-5, 3-30 mm, hypo / hyper / rim-enhancing), always inside the liver
    dist_in = ndi.distance_transform_edt(liver, sampling=(sz, sy, sx))
    for _ in range(int(rng.integers(0, 6))):
        r = np.exp(U(np.log(1.5), np.log(15.0)))
        cand = np.flatnonzero(dist_in >= max(0.6 * r, 2.0))
        if cand.size == 0:
            continue
        d0, h0, w0 = np.unravel_index(cand[rng.integers(cand.size)], shape)
        c = (X[0, 0, w0], Y[0, h0, 0], Z[d0, 0, 0])
        lq = _quadric(X, Y, Z, c, tuple(r * U(0.8, 1.2, 3)), U(0, np.pi))
        les = (lq < 1) & liver
        kind = rng.choice(3, p=[0.6, 0.25, 0.15])
        hu[les] = liv_hu + (-U(25, 70) if kind != 1 else U(20, 60)) + 3 * f_mid[les]
        if kind == 2:
            hu[les & (lq > 0.55)] = liv_hu + U(20, 50)
        lab[les] = 2

    # ---- bone last (cortex / cancellous / discs), ribs as periodic oblique cross-sections
    hu[vb] = U(150, 320)
    hu[vb_cortex] = U(600, 1000)
    hu[discs] = U(70, 100)
    hu[canal] = U(5, 25)
    hu[post] = U(400, 800)
    rib_hu, pitch, z_low = U(500, 900), U(30, 40), zt - U(90, 130)
    ae, be = a - tf - tm / 2, 0.9 * b - tf - tm / 2
    for th in np.deg2rad(np.arange(U(20, 35), 330, U(18, 24))):
        if abs(np.rad2deg(th) - 270) < 25:
            continue                                      # no rib spots over the anterior midline / spine
        cth, sth = np.cos(th), np.sin(th)
        rad = 1.0 / (np.abs(cth / ae) ** n + np.abs(sth / be) ** n) ** (1 / n)
        spot = np.hypot(X - rad * cth, Y - rad * sth)[0] < U(4, 6)
        band = (((Z[:, 0, 0] + U(0, pitch)) % pitch) < U(8, 14)) & (Z[:, 0, 0] > z_low)
        m = band[:, None, None] & spot[None] & body
        hu[m] = rib_hu
    # ---- patient table below the back, blur, correlated noise, reconstruction circle
    tab_y = -0.9 * b - U(5, 25)
    table = (Y < tab_y) & (Y > tab_y - U(8, 15)) & (np.abs(X) < 0.95 * a)
    hu[full(table) & ~body] = U(-250, 50)
    hu = ndi.gaussian_filter(hu, sigma=(U(0.2, 0.5), U(0.4, 0.9), U(0.4, 0.9)))
    noise = ndi.gaussian_filter(rng.standard_normal(shape), sigma=(0, 0.7, 0.7))
    hu += noise * (U(5, 25) / noise.std())
    if rng.random() < 0.4:
        rr = np.hypot(np.arange(H)[:, None] - (H - 1) / 2, np.arange(W)[None, :] - (W - 1) / 2)
        hu[:, rr > min(H, W) / 2] = -1024
    hu = np.clip(np.rint(hu), -1024, 3071).astype(np.int16)

    # ---- store in a non-RAS order with the truthful voxel -> RAS+ affine
    ox, oy, oz = U(-20, 20), U(-30, 30), -U(100, 700)
    aff_int = np.array([[0, 0, -sx, cw * sx + ox], [0, -sy, 0, ch * sy + oy], [sz, 0, 0, oz], [0, 0, 0, 1.0]])
    if orientation is None:
        orientation = ("L", "P", "S") if rng.random() < 0.5 else _ORDERS[int(rng.integers(len(_ORDERS)))]
    ornt = nio.ornt_transform(nio.axcodes2ornt(INTERNAL_AXCODES), nio.axcodes2ornt(tuple(orientation)))
    affine = aff_int @ nio.inv_ornt_aff(ornt, shape)
    vol = np.ascontiguousarray(nio.apply_orientation(hu, ornt)).astype(np.int16)
    seg = np.ascontiguousarray(nio.apply_orientation(lab, ornt)).astype(np.uint8)
    return vol, seg, affine


def save_case(out_dir, index: int, vol, seg, affine) -> None:
    for name, arr in (("volume", vol), ("segmentation", seg)):
        img = nib.Nifti1Image(arr, affine)
        img.set_sform(affine, code=1)
        img.set_qform(affine, code=1)
        img.header.set_xyzt_units("mm")
        nib.save(img, str(Path(out_dir) / f"{name}-{index}.nii.gz"))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out_dir")
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--shape", type=int, nargs=3, default=(40, 256, 256), metavar=("D", "H", "W"))
    args = ap.parse_args(argv)
    Path(args.out_dir).mkdir(parents=True, exist_ok=True)
    for i in range(args.n):
        vol, seg, affine = make_foreign_case(args.seed + i, tuple(args.shape))
        save_case(args.out_dir, i, vol, seg, affine)
        print(f"case {i}: stored {vol.shape} {''.join(nib.aff2axcodes(affine))}  "
              f"liver {int((seg >= 1).sum())} vox  lesion {int((seg == 2).sum())} vox")


if __name__ == "__main__":
    main()
