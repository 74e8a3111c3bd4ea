"""patch_fill: removal that leaves no footprint on the CPU default (issue 16).

Telea/Navier-Stokes diffuse the boundary colors inward: the fill is a smooth smear with ~0.2x
the texture of its surroundings, which a person (and a flat-texture detector) sees at once.
This fill copies real background instead, the way shift-map and exemplar methods do, but with
one offset per piece of the hole so it stays cheap and deterministic:

1. every connected piece of the hole is matched by its ring (the known pixels around it) against
   the whole image: masked sum of squared differences, over the offsets where the piece plus its
   ring lands on pixels that are neither the hole nor a forbidden object (another annotated
   object; one that covers most of the ring is the surface the object stands on, e.g. a saucer
   under a cup, and may be copied). Coarse to fine (``_best_offset``): one masked SSD over every
   offset in gray at half resolution (from the image's spectra, ``_Source.coarse_ssd``), the
   best few offsets scored exactly in color, the best of them refined within +-2 px;
2. the best offset's pixels are pasted into the piece, plus a smooth correction: the ring's
   color mismatch spread inward by normalized Gaussian convolution, so there is no seam;
3. a piece with no such offset (it is too big to fit elsewhere) is cut in two along its longer
   side and each half filled the same way, the halves filled earlier becoming context for the
   later ones; past ``max_depth`` cuts, Telea fills what is left. Deeper cutting was tried: on
   the demo photos a person- or cup-sized hole became a collage of many small copies (texture
   right, content wrong), worse than a smear that verify rejects honestly;
4. lighting is separated from texture (``_relight``, per connected part of the hole): the fill's
   low-pass (Gaussian at ``light_sigma``) is replaced by a field spanned by the surroundings: a
   plane fitted by least squares to their low-pass (so a sky gradient or vignette goes on to
   the image border) plus the membrane (Laplace equation; Neumann at the image border) of what
   the plane misses on the hole's edge, the offset-field form of Poisson image editing
   (Perez et al. 2003). A copy keeps its texture; the Telea smear is replaced by the field
   itself. Before, the correction of step 2 faded to zero a few sigma inside, so a wide hole or
   one along the image border kept its source's brightness, and Telea's fast-marching fronts
   met in a crease: on the rocket photo, a lighter wavy band where the right tower was.

Pixels outside the hole are copied from the input bit for bit; single-threaded OpenCV and a
first-index argmin make the same input give the same bytes.

Cost (issue 27): what every piece reads of the image is made once per call (``_Source``: the
gray copy's spectra too, so a piece's coarse search is one inverse transform); the plane comes
from image moments, the membrane from one banded Cholesky solve on at most ``_MAX_UNKNOWNS``
grid cells, and a part walled in by known pixels with no Telea pixel needs no plane at all
(``_plane_cancels``) and is relit on one coarse grid, its low-pass and membrane both on
cells about ``sigma / 2`` wide (``_relight_walled``); channels are worked on as whole planes, not
by numpy's broadcasting of a trailing axis of 3. On bench/cpu_cost.py's scenes the fill costs
~2.3x less CPU than at 67ed51a, about 1.5x less again than at 03e4ddf, and ~1.2x less again
than at 386b596 (BENCHMARKS.md, "Issue 27, part fill", "part fill, second pass" and "session 5,
part s28fill").

~600 lines on purpose: the search, the relight and the membrane read the same ``_Source`` and
hand each other crops; split into modules they would pass a dozen arrays across every call.
"""

from __future__ import annotations

import cv2
import numpy as np

from counterfactory.stages.shared import bbox, cv_inpaint, disk, one_blas_thread


def patch_fill(img: np.ndarray, hole: np.ndarray, forbid: np.ndarray | None = None, *,
               min_ring: int = 6, max_ring: int = 24, max_depth: int = 2,
               surface_share: float = 0.5, radius: int = 5, light_sigma: float | None = None) -> np.ndarray:
    """``img`` with ``hole`` (uint8, non-zero = fill) filled by copied background.

    ``forbid``: pixels (other annotated objects) never copied into the hole, unless they cover
    more than ``surface_share`` of a piece's ring (the surface it lies on: a saucer under
    a cup; a cup that only borders a saucer's inner edge is not copied into the saucer's hole).
    ``light_sigma``: the scale below which the fill's own texture is kept (default: a tenth of
    the square root of the part's area, 8 to 32 pixels)."""
    hole = (hole > 0).astype(np.uint8) * 255
    out = img.copy()
    if not cv2.countNonZero(hole):
        return out
    forbid = np.zeros_like(hole) if forbid is None else (forbid > 0).astype(np.uint8) * 255
    src = _Source(img, hole, forbid)
    todo = hole.copy()  # still unfilled
    n, labels = cv2.connectedComponents(hole, connectivity=8)
    pieces = [(cv2.compare(labels, i, cv2.CMP_EQ), 0) for i in range(1, n)]
    # each part's box and area for _relight (connectedComponentsWithStats costs 5x as much)
    parts = [(i, *cv2.boundingRect(p), cv2.countNonZero(p)) for i, (p, _) in enumerate(pieces, 1)]
    while pieces:
        piece, depth = pieces.pop(0)
        if _fill_piece(out, src, todo, piece, min_ring, max_ring, surface_share):
            cv2.subtract(todo, piece, dst=todo)  # both 0/255
            continue
        y0, y1, x0, x1 = bbox(piece)
        if depth >= max_depth or (y1 - y0 < 8 and x1 - x0 < 8):
            continue  # left to the Telea pass below
        half = np.zeros_like(piece)
        if y1 - y0 >= x1 - x0:
            half[y0 : (y0 + y1) // 2] = 255
        else:
            half[:, x0 : (x0 + x1) // 2] = 255
        a, b = cv2.bitwise_and(piece, half), cv2.bitwise_and(piece, cv2.bitwise_not(half))
        # depth-first: the first half's fill becomes context for the second
        pieces[:0] = [(p, depth + 1) for p in (a, b) if cv2.countNonZero(p)]
    if cv2.countNonZero(todo):
        y0, y1, x0, x1 = bbox(todo)
        pad = 4 * radius + 8
        y0, x0 = max(0, y0 - pad), max(0, x0 - pad)
        y1, x1 = min(hole.shape[0], y1 + pad), min(hole.shape[1], x1 + pad)
        crop = np.ascontiguousarray(out[y0:y1, x0:x1])
        cm = np.ascontiguousarray(todo[y0:y1, x0:x1])
        # a lower resolution here was tried (issue 27): _relight gives these pixels its field
        # alone, but the low-pass of the pixels around them, the field's boundary values, reads
        # Telea's fill; at half resolution a wide leftover's error grew by 0.4-0.6 levels
        filled = cv_inpaint(crop, cm, radius, cv2.INPAINT_TELEA)
        sel = cm > 0
        out[y0:y1, x0:x1][sel] = filled[sel]
    return _relight(out, hole, forbid, todo, light_sigma, labels, parts)


# the membrane is solved on at most about this many unknowns (the hole downscaled by an integer
# factor, then upsampled): the field is smooth at light_sigma >= 8 px; a banded Cholesky this
# size takes ~0.3 ms (1,024 before issue 27: on the bench's fills the pixels move by 0.03 levels
# on average, at most 1)
_MAX_UNKNOWNS = 512


def _relight(out: np.ndarray, hole: np.ndarray, forbid: np.ndarray, smear: np.ndarray,
             sigma: float | None, labels: np.ndarray, parts: list[tuple[int, ...]]) -> np.ndarray:
    """Replace the low-pass of ``out`` in each connected part of ``hole`` by the lighting its
    surroundings span (module docstring, step 4); ``smear`` (Telea's pixels) takes that field
    alone. The change is zero on the hole's edge, so no seam; pixels outside stay as they are.
    ``labels``: ``hole``'s 8-connected components; ``parts``: (label, x, y, width, height, area)
    of each."""
    # loaded before the limit, which acts on the BLAS libraries loaded when it is first made
    import scipy.linalg  # noqa: F401 - scikit-image's dependency; imported only when a hole is filled

    with one_blas_thread():  # once per call, not per solve (issue 27)
        for part in parts:
            _relight_part(out, hole, forbid, smear, sigma, labels, *part)
    return out


def _relight_part(out: np.ndarray, hole: np.ndarray, forbid: np.ndarray, smear: np.ndarray,
                  sigma: float | None, labels: np.ndarray, i: int, cx0: int, cy0: int, bw: int, bh: int,
                  area: int) -> None:
    """``_relight`` of the part labelled ``i`` (its box and area from the component stats)."""
    H, W = hole.shape
    cy1, cx1 = cy0 + bh, cx0 + bw
    sg = float(sigma) if sigma is not None else min(max(0.1 * np.sqrt(area), 8.0), 32.0)
    m = int(np.ceil(4 * sg))
    # the membrane's box: known pixels around the part at least two of its grid cells deep
    b = 2 * int(np.ceil(np.sqrt(area / _MAX_UNKNOWNS))) + 1
    y0, x0, y1, x1 = max(0, cy0 - b), max(0, cx0 - b), min(H, cy1 + b), min(W, cx1 + b)
    inside = (y0, x0, y1, x1) == (cy0 - b, cx0 - b, cy1 + b, cx1 + b)
    if inside and _plane_cancels(hole[y0:y1, x0:x1], smear[y0:y1, x0:x1], area):
        _relight_walled(out, hole, labels, i, cy0, cx0, cy1, cx1, sg, area)
        return
    # the plane is fitted to the surroundings within ``reach``; the low-pass needs 4 sigma more
    reach = int(max(2 * sg, 0.5 * np.sqrt(area), 2 * np.sqrt(area / _MAX_UNKNOWNS) + 3))
    fy0, fx0, fy1, fx1 = max(0, cy0 - reach), max(0, cx0 - reach), min(H, cy1 + reach), min(W, cx1 + reach)
    py0, px0, py1, px1 = max(0, fy0 - m), max(0, fx0 - m), min(H, fy1 + m), min(W, fx1 + m)
    low = _lowpass(out[py0:py1, px0:px1], sg)[fy0 - py0 : fy1 - py0, fx0 - px0 : fx1 - px0]
    known = hole[fy0:fy1, fx0:fx1] == 0
    if not known.any():
        return
    fit = known & (forbid[fy0:fy1, fx0:fx1] == 0)  # another object is no lighting
    sub = (slice(y0 - fy0, y1 - fy0), slice(x0 - fx0, x1 - fx0))
    plane = _plane(low, fit if np.count_nonzero(fit) >= 16 else known, sub)
    free = labels[y0:y1, x0:x1] == i
    lo = low[sub]
    sm = smear[y0:y1, x0:x1]
    smeared = cv2.countNonZero(sm) > 0
    delta, fine = _membrane_delta(lo - plane, known[sub], free, fine=smeared)
    box = out[y0:y1, x0:x1]
    # a copy keeps its texture, faded out over ``sg`` toward Telea's pixels, which take the
    # field alone (Telea's fronts meet in creases; a texture that stops at a straight cut
    # shows the cut)
    base = box.astype(np.float32) - lo
    if smeared:
        keep = np.minimum(cv2.distanceTransform((sm == 0).astype(np.uint8), cv2.DIST_L2, 5) / sg, 1.0)
        # where the texture fades out, so does the low-pass's detail the membrane's grid cannot
        # see: Telea's pixels take the field alone
        base = lo + keep[..., None] * base - (1 - keep[..., None]) * fine
    else:  # keep = 1 everywhere: the same sums without the products by 1 and 0
        base = lo + base
    base += delta
    # the whole box at once, written where the part is (boolean indexing of three channels was
    # most of this function's own time): the same rounding, pixel for pixel
    cv2.copyTo(_to_u8(base), free.view(np.uint8), box)


def _relight_walled(out: np.ndarray, hole: np.ndarray, labels: np.ndarray, i: int, cy0: int, cx0: int,
                    cy1: int, cx1: int, sg: float, area: int) -> None:
    """``_relight_part`` of a walled-in part (``_plane_cancels``), all on one coarse grid (issue
    27, s28fill): the box's block means (cells of ``f`` ~ ``sg / 2`` pixels a side), their
    low-pass at ``sg / f`` cells, the membrane of the known cells' low-pass over the free cells
    (a cell is what most of its pixels are, as in ``_membrane_delta``), and ``u - g`` upsampled
    bilinearly onto the free pixels: ``box + u - g``. Both fields are smooth at ``sg``, two cells. Before, the low-pass
    was made on a grid of its own (``sg // 4``), upsampled to every pixel and summed into the
    membrane's blocks (at most ``_MAX_UNKNOWNS`` free cells, often a quarter of ``sg``) again:
    1.2x the fill's cost, and on bench/fill_quality.py's scenes and photos the same figures
    to +-0.002 (BENCHMARKS.md, "Issue 27, session 5, part s28fill")."""
    H, W = hole.shape
    f = max(2, int(np.ceil(np.sqrt(area / _MAX_UNKNOWNS))), round(sg / 2))
    b = 2 * f + 1  # known cells around the part at least two deep
    # the membrane's box, whole cells from its top-left corner (known pixels at least the
    # caller's depth inside the image), and the low-pass's margin
    y0, x0 = max(0, cy0 - b), max(0, cx0 - b)
    nh, nw = -(-(cy1 + b - y0) // f), -(-(cx1 + b - x0) // f)
    y1, x1 = y0 + nh * f, x0 + nw * f
    mc = int(np.ceil(4 * sg / f))  # cells
    py0, px0, py1, px1 = y0 - mc * f, x0 - mc * f, y1 + mc * f, x1 + mc * f
    # reflected past the image's edge, as the Gaussian's border is; the hole lies b inside it
    t, lft, bot, rgt = max(0, -py0), max(0, -px0), max(0, py1 - H), max(0, px1 - W)
    crop = out[py0 + t : py1 - bot, px0 + lft : px1 - rgt].astype(np.float32)
    if t or lft or bot or rgt:
        crop = cv2.copyMakeBorder(crop, t, bot, lft, rgt, cv2.BORDER_REFLECT)
    small = cv2.resize(crop, ((px1 - px0) // f, (py1 - py0) // f), interpolation=cv2.INTER_AREA)
    lo = cv2.GaussianBlur(small, (0, 0), sg / f, borderType=cv2.BORDER_REFLECT)[mc : mc + nh, mc : mc + nw]
    # the box's pixels in the image; each cell's known and free shares (past the image's edge,
    # and on another part of the hole in the box, neither: not linked, as in _membrane_delta)
    by1, bx1 = min(H, y1), min(W, x1)
    fm = labels[y0:by1, x0:bx1] == i
    shares = np.zeros((nh * f, nw * f, 2), np.float32)
    shares[: by1 - y0, : bx1 - x0, 0] = hole[y0:by1, x0:bx1] == 0
    shares[: by1 - y0, : bx1 - x0, 1] = fm
    k, u = cv2.split(cv2.resize(shares, (nw, nh), interpolation=cv2.INTER_AREA))
    known_c = (k > 0) & ((u == 0) | (k >= u))
    free_c = (u > 0) & ~known_c
    d = _harmonic(lo, known_c, free_c)
    delta = cv2.resize(d, (nw * f, nh * f), interpolation=cv2.INTER_LINEAR)[: by1 - y0, : bx1 - x0]
    box = out[y0:by1, x0:bx1]
    cv2.copyTo(_to_u8(box.astype(np.float32) + delta), fm.view(np.uint8), box)


def _plane_cancels(hole: np.ndarray, smear: np.ndarray, area: int) -> bool:
    """Whether the plane cannot move a part's fill, given the membrane's box (inside the image)
    of ``hole`` and ``smear``: every free pixel's neighbours are free or known (no image border,
    no other part of the hole in the box: no Neumann edge) and none is Telea's (every pixel a
    copy, which takes ``box + u - g``). A plane is harmonic, so then ``u - g`` is the same with
    or without it, up to the coarse grid's part-filled cells (on the bench's fills 0.01 levels
    on average, at most 1): neither the plane nor the low-pass of its wider box is made (issue
    27)."""
    return not cv2.countNonZero(smear) and cv2.countNonZero(hole) == area


def _to_u8(a: np.ndarray) -> np.ndarray:
    """``np.clip(np.rint(a), 0, 255).astype(np.uint8)`` of a float32 array in one call (OpenCV's
    saturating conversion rounds half to even as ``np.rint`` does)."""
    return cv2.add(a, 0, dtype=cv2.CV_8U)


def _lowpass(img: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian low-pass (float32, reflected at the edge); a wide one runs on a copy shrunk by
    an integer factor (exact block means) and is upsampled bilinearly: it is smooth anyway."""
    k = max(1, int(sigma // 4))
    a = img.astype(np.float32)
    if k == 1:
        return cv2.GaussianBlur(a, (0, 0), sigma, borderType=cv2.BORDER_REFLECT)
    h, w = a.shape[:2]
    hc, wc = -(-h // k), -(-w // k)
    a = cv2.copyMakeBorder(a, 0, hc * k - h, 0, wc * k - w, cv2.BORDER_REFLECT)
    small = cv2.resize(a, (wc, hc), interpolation=cv2.INTER_AREA)
    small = cv2.GaussianBlur(small, (0, 0), sigma / k, borderType=cv2.BORDER_REFLECT)
    return cv2.resize(small, (wc * k, hc * k), interpolation=cv2.INTER_LINEAR)[:h, :w]


def _plane(low: np.ndarray, where: np.ndarray, sub: tuple[slice, slice], slack: float = 0.5) -> np.ndarray:
    """The least-squares plane through ``low`` (per channel) at ``where`` (every ``step``-th
    row and column, ~1000 points: on a copy's pixels the plane cancels out; it matters where
    the hole meets the image border and for Telea's pixels), on the part ``sub`` of the box
    (the membrane's; each value is the one the whole box's plane has there), clipped to the
    range it was fitted on widened by ``slack`` of it on each side (a gradient goes on past the
    hole's edge, but not without end). Solved in closed form from the centred normal equations,
    whose sums are image moments (``cv2.moments``, in double: four calls, issue 27); points on a
    line (rank 1) take the gradient along it only, as the least-norm solution does."""
    step = max(1, int(np.sqrt(np.count_nonzero(where) / 1000)))
    m8 = where[::step, ::step].astype(np.uint8)
    low = low[::step, ::step]
    mw = cv2.moments(m8, binaryImage=True)
    n = mw["m00"]
    mx, my = mw["m10"] / n, mw["m01"] / n  # the points' mean, in the step grid's columns and rows
    sxx, sxy, syy = mw["mu20"], mw["mu11"], mw["mu02"]  # central second moments
    wv = low * m8[..., None]
    mv = [cv2.moments(np.ascontiguousarray(wv[..., c])) for c in range(low.shape[2])]
    mean_v = np.array([m["m00"] for m in mv]) / n
    # sum((x - mx) v), sum((y - my) v) per channel
    cxv = np.array([m["m10"] for m in mv]) - mx * mean_v * n
    cyv = np.array([m["m01"] for m in mv]) - my * mean_v * n
    det = sxx * syy - sxy * sxy
    if det > 1e-9 * max(sxx * syy, 1e-300):
        bx, by = (syy * cxv - sxy * cyv) / det, (sxx * cyv - sxy * cxv) / det
    else:  # collinear (or one point): the slope along the line, none across it
        tr = sxx + syy
        bx, by = (sxx * cxv + sxy * cyv) / max(tr * tr, 1e-300), (sxy * cxv + syy * cyv) / max(tr * tr, 1e-300)
    lo, hi = np.zeros(low.shape[2]), np.zeros(low.shape[2])
    for c in range(low.shape[2]):
        lo[c], hi[c] = cv2.minMaxLoc(np.ascontiguousarray(low[..., c]), m8)[:2]
    gx = ((np.arange(sub[1].start, sub[1].stop) / step - mx)[None, :, None] * bx).astype(np.float32)
    gy = ((np.arange(sub[0].start, sub[0].stop) / step - my)[:, None, None] * by + mean_v).astype(np.float32)
    plane = gx + gy
    np.maximum(plane, (lo - slack * (hi - lo)).astype(np.float32), out=plane)  # np.clip, without its overhead
    return np.minimum(plane, (hi + slack * (hi - lo)).astype(np.float32), out=plane)


def _membrane_delta(g: np.ndarray, known: np.ndarray, free: np.ndarray,
                    fine: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
    """``u - g`` on ``free`` pixels (the only ones read), where ``u`` is harmonic on ``free`` and
    equals the smooth field ``g`` on ``known`` pixels (Dirichlet); pixels neither known nor free
    and the box's edge (the image border) are not linked (Neumann). A large ``free`` is solved
    on a grid downscaled by an integer factor and the difference upsampled (bilinear): it
    vanishes toward the known pixels, so the upsampling leaves no step there. Second: what of
    ``g`` the grid does not see (``g`` less its upsampled block means, on ``free``; zero at full
    resolution): a pixel that takes the field alone subtracts it, so its value does not depend
    on the detail of what was there (Telea's fill); None unless ``fine`` (only Telea's pixels
    read it)."""
    h, w = known.shape
    c = g.shape[2]
    n_free = int(np.count_nonzero(free))
    f = max(1, int(np.ceil(np.sqrt(n_free / _MAX_UNKNOWNS))))
    if f > 1:
        hc, wc = -(-h // f), -(-w // f)

        kn, fr = known.astype(np.float32), free.astype(np.float32)
        gs = cv2.split(np.ascontiguousarray(g, np.float32))
        # the block sums / f² of known, free, g on known and g on free as one image (one border
        # and one resize, issue 27); the blocks past the box's edge are zero-padded
        bs = cv2.split(cv2.resize(cv2.copyMakeBorder(cv2.merge([kn, fr, *(a * kn for a in gs), *(a * fr for a in gs)]),
                                                     0, hc * f - h, 0, wc * f - w, cv2.BORDER_CONSTANT, value=0),
                                  (wc, hc), interpolation=cv2.INTER_AREA))
        k, u = bs[0], bs[1]
        kk, uu = np.maximum(k, 1e-6), np.maximum(u, 1e-6)
        gk = _merge([a / kk for a in bs[2 : 2 + c]])
        gf = _merge([a / uu for a in bs[2 + c :]])  # the free pixels' mean
        known_c = (k > 0) & ((u == 0) | (k >= u))
        free_c = (u > 0) & ~known_c
        d = _membrane_delta(gk, known_c, free_c, fine=False)[0] + (gk - gf) * _merge([free_c.astype(np.float32)] * c)
        if not fine:
            return cv2.resize(d, (wc * f, hc * f), interpolation=cv2.INTER_LINEAR)[:h, :w], None
        g_c = np.where(_merge([free_c.view(np.uint8)] * c).view(bool), gf, gk)
        both = cv2.resize(np.concatenate([d, g_c], axis=2).astype(np.float32), (wc * f, hc * f),
                          interpolation=cv2.INTER_LINEAR)[:h, :w]
        return both[..., :3], g - both[..., 3:]  # read on free pixels only
    return _harmonic(g, known, free), np.zeros(g.shape, np.float32) if fine else None


def _merge(planes: list[np.ndarray]) -> np.ndarray:
    """``planes`` (2-D, one dtype) as the channels of one contiguous array (``cv2.merge``, which
    returns one plane as 2-D: given back with its channel axis). Elementwise work on whole
    arrays instead of numpy broadcasting a trailing axis of 3, which runs a short inner loop at
    ~10x the cost (issue 27)."""
    m = cv2.merge(planes)
    return m if m.ndim == 3 else m[..., None]


def _harmonic(g: np.ndarray, known: np.ndarray, free: np.ndarray) -> np.ndarray:
    """``_membrane_delta`` at full resolution: the five-point Laplace equation on every pixel of
    the box (a pixel not free is its own equation, ``u = g``), ordered along the box's longer
    side so the matrix is a band as wide as the shorter one: symmetric positive definite, one
    banded Cholesky solve (LAPACK pbsv; ``n * side**2`` operations, ~0.2 ms at 512 unknowns)."""
    import scipy.linalg as sl  # loaded by _relight before its BLAS limit

    out = np.zeros(g.shape, np.float32)
    bx, by, bw, bh = cv2.boundingRect(free.view(np.uint8))
    if not bw:
        return out
    # the box of the free pixels and one pixel around: the rest takes no part
    y0, y1, x0, x1 = max(0, by - 1), min(free.shape[0], by + bh + 1), max(0, bx - 1), min(free.shape[1], bx + bw + 1)
    fr, kn, gg = free[y0:y1, x0:x1], known[y0:y1, x0:x1], g[y0:y1, x0:x1].astype(np.float64)
    tr = fr.shape[0] < fr.shape[1]
    if tr:  # rows along the longer side: the band is the shorter one
        fr, kn, gg = fr.T, kn.T, gg.transpose(1, 0, 2)
    hh, ww = fr.shape
    c = gg.shape[2]
    frf, knf = fr.astype(np.float64), kn.astype(np.float64)
    # links between 4-neighbours: free-free pairs are unknowns on both sides; free-known pairs
    # move the known value to the right-hand side
    # free or known neighbours of each pixel, and the sum of the known ones' values: one 3 x 3
    # filter each (zero past the box's edge)
    nb = cv2.filter2D(frf + knf, -1, _CROSS, borderType=cv2.BORDER_CONSTANT)
    rhs = cv2.filter2D(gg * _merge([knf] * c), -1, _CROSS, borderType=cv2.BORDER_CONSTANT)
    # upper band: row ww the diagonal, row ww - k the k-th above; the links written into it
    # (issue 27, s28fill: no arrays of their own, the same values)
    ab = np.zeros((ww + 1, hh * ww))
    ab[ww - 1].reshape(hh, ww)[:, 1:] = -(frf[:, 1:] * frf[:, :-1])  # -1 between (i, j - 1) and (i, j), both free
    ab[0].reshape(hh, ww)[1:] = -(frf[1:] * frf[:-1])  # -1 between (i - 1, j) and (i, j), both free
    # a free part that touches no known pixel (walled in by the border) takes the known mean: a
    # tiny pull toward it keeps the system regular
    eps = 1e-6
    nk = np.count_nonzero(known)
    kmean = (g.reshape(-1, c).T @ known.reshape(-1).astype(g.dtype)) / nk if nk else np.zeros(c)
    ab[ww] = np.where(fr, nb + eps, 1.0).ravel()
    fr3 = fr[..., None]  # broadcast over the channels (selection only)
    rhs = np.where(fr3, rhs + eps * kmean, gg)
    if ww > 1:  # LAPACK pbsv as solveh_banded calls it, without its checks and copies
        _, u, info = sl.lapack.dpbsv(ab, rhs.reshape(-1, c), lower=0, overwrite_ab=1, overwrite_b=1)
        if info:
            raise np.linalg.LinAlgError(f"pbsv: {info}")
        u = u.reshape(hh, ww, c)
    else:
        u = sl.solveh_banded(ab, rhs.reshape(-1, c), check_finite=False).reshape(hh, ww, c)
    d = np.where(fr3, u - gg, 0.0).astype(np.float32)
    out[y0:y1, x0:x1] = d.transpose(1, 0, 2) if tr else d
    return out


_CROSS = np.array([[0, 1, 0], [1, 0, 1], [0, 1, 0]], np.float64)  # the four neighbours


class _Source:
    """What every piece's search reads of one image, made once per ``patch_fill`` call: the
    input (the only source of copied pixels; never a fill), its gray half-resolution copy and
    that copy's spectra for the coarse search, the other objects, and the integral image of the
    pixels no source box may touch when no object is a piece's surface (the usual case)."""

    def __init__(self, img: np.ndarray, hole: np.ndarray, forbid: np.ndarray) -> None:
        self.img = img
        self.imgf = img.astype(np.float32)
        self.hole = hole
        self.n_obj, self.objs = cv2.connectedComponents(forbid, connectivity=8)
        self._blocked_integ = None
        self._gray_half = None
        self._spectra = None

    @property
    def gray_half(self) -> np.ndarray:
        if self._gray_half is None:
            g = cv2.cvtColor(self.imgf, cv2.COLOR_RGB2GRAY)
            self._gray_half = cv2.resize(g, (g.shape[1] // 2, g.shape[0] // 2), interpolation=cv2.INTER_AREA)
        return self._gray_half

    def coarse_ssd(self, tmpl: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """What ``_ssd(self.gray_half, tmpl, mask)`` (``cv2.matchTemplate``, a 0/1 mask) gives,
        from the spectra of the gray image and its square, made once per call (issue 27): the
        masked SSD is sum(mask g^2) - 2 sum(mask tmpl g) + sum(mask tmpl^2) at every offset, two
        correlations, here one product of spectra each and one inverse transform for both.
        matchTemplate transformed the image twice per piece and inverted twice: 2.7x the cost.
        The figures agree to a few units in ~1e5 (both are transforms in float32); only the
        ranking of the coarse offsets is read, and their best are scored exactly."""
        g = self.gray_half
        if self._spectra is None:
            n, m = cv2.getOptimalDFTSize(g.shape[0]), cv2.getOptimalDFTSize(g.shape[1])
            # zero-padded: an offset the result keeps never wraps around
            pad = cv2.copyMakeBorder(g, 0, n - g.shape[0], 0, m - g.shape[1], cv2.BORDER_CONSTANT, value=0)
            self._spectra = cv2.dft(pad), cv2.dft(pad * pad)
        fg, fg2 = self._spectra
        th, tw = tmpl.shape
        pm, pt = np.zeros(fg.shape, np.float32), np.zeros(fg.shape, np.float32)
        pm[:th, :tw] = mask
        tm = tmpl * mask
        pt[:th, :tw] = tm
        spec = cv2.mulSpectrums(fg2, cv2.dft(pm, nonzeroRows=th), 0, conjB=True)
        spec -= 2 * cv2.mulSpectrums(fg, cv2.dft(pt, nonzeroRows=th), 0, conjB=True)
        rh, rw = g.shape[0] - th + 1, g.shape[1] - tw + 1
        r = cv2.idft(spec, flags=cv2.DFT_REAL_OUTPUT | cv2.DFT_SCALE, nonzeroRows=rh)[:rh, :rw]
        return r + float(np.vdot(tm, tmpl))

    def blocked_integral(self, surface: np.ndarray | None) -> np.ndarray:
        """Integral image of the hole plus every object but the ``surface`` ones (a bool per
        object label; None: none)."""
        if surface is None or not surface[1:].any():
            if self._blocked_integ is None:
                no_src = self.hole | (self.objs > 0).astype(np.uint8) if self.n_obj > 1 else self.hole
                self._blocked_integ = cv2.integral((no_src > 0).astype(np.uint8))
            return self._blocked_integ
        lut = (~surface).astype(np.uint8)
        lut[0] = 0
        return cv2.integral(((self.hole > 0) | (lut[self.objs] > 0)).astype(np.uint8))


def _ssd(img: np.ndarray, tmpl: np.ndarray, rmask: np.ndarray) -> np.ndarray:
    """Masked sum of squared differences of ``tmpl`` at every offset in ``img`` (``rmask`` has
    the template's channels)."""
    return cv2.matchTemplate(img, tmpl, cv2.TM_SQDIFF, mask=rmask)


def _smallest(a: np.ndarray, k: int) -> np.ndarray:
    """Flat indices of the ``k`` smallest finite values of ``a``, in increasing order, ties by
    index (what a stable argsort gives, without sorting the whole array)."""
    flat = a.ravel()
    if flat.size > k:
        v = np.partition(flat, k - 1)[k - 1]  # the k-th smallest (no index array: 2.5x cheaper)
        cand = np.flatnonzero(flat <= v) if np.isfinite(v) else np.flatnonzero(np.isfinite(flat))
    else:
        cand = np.flatnonzero(np.isfinite(flat))
    return cand[np.argsort(flat[cand], kind="stable")][:k]


def _allowed(integ: np.ndarray, th: int, tw: int, step: int = 1) -> np.ndarray:
    """Offsets (every ``step``-th) whose ``th`` x ``tw`` box holds no blocked pixel, from the
    blocked pixels' integral image: one answer for every offset at once."""
    a, b = integ[th::step, tw::step], integ[: -th : step, tw::step]
    c, d = integ[th::step, : -tw : step], integ[: -th : step, : -tw : step]
    return (a - b - c + d) == 0


def _best_offset(src: _Source, ctx: np.ndarray, rmask: np.ndarray, integ: np.ndarray,
                 top: int = 8) -> tuple[int, int] | None:
    """The allowed offset whose ring matches best. The search runs on gray at half resolution
    (``src.coarse_ssd``); the ``top`` best coarse offsets are scored in color at full
    resolution (the exact masked SSD, one ``cv2.norm`` each), and the best of them is
    refined within +-2 px; ties go to the first index (deterministic). Offsets whose box
    touches a pixel of the integral image ``integ`` are not allowed; None: no offset is. Before (issue 27) each of
    the top 4 was refined, a matchTemplate each: twice the cost, and on the bench's scenes the
    chosen offsets' SSD is the same on average (as many better as worse)."""
    imgf = src.imgf
    th, tw = ctx.shape[:2]
    if min(th, tw) < 24:
        return _exhaustive(imgf, ctx, rmask, _allowed(integ, th, tw))
    cs = cv2.resize(cv2.cvtColor(ctx, cv2.COLOR_RGB2GRAY), (tw // 2, th // 2), interpolation=cv2.INTER_AREA)
    ms = (cv2.resize(rmask, (tw // 2, th // 2), interpolation=cv2.INTER_AREA) > 0.99).astype(np.float32)
    coarse = src.coarse_ssd(cs, ms)
    # coarse offset (cy, cx) is full-resolution offset (2cy, 2cx): allowed if that one is
    ok_s = _allowed(integ, th, tw, 2)
    ch, cw = min(coarse.shape[0], ok_s.shape[0]), min(coarse.shape[1], ok_s.shape[1])
    coarse = np.where(ok_s[:ch, :cw], coarse[:ch, :cw], np.inf)
    order = _smallest(coarse, top)
    if not len(order):  # no even offset allowed: perhaps an odd one
        return _exhaustive(imgf, ctx, rmask, _allowed(integ, th, tw))
    m8 = (rmask > 0).astype(np.uint8)
    # the exact SSDs on the 8-bit pixels (``ctx`` holds an image's values): the same sums as in
    # float32, at half the cost
    img8, ctx8 = src.img, ctx.astype(np.uint8)
    best, (by, bx) = np.inf, (0, 0)
    for flat in order:
        cy, cx = divmod(int(flat), coarse.shape[1])
        d = cv2.norm(img8[2 * cy : 2 * cy + th, 2 * cx : 2 * cx + tw], ctx8, cv2.NORM_L2SQR, m8)
        if d < best:
            best, (by, bx) = d, (2 * cy, 2 * cx)
    # the +-2 px window around it, exact too (25 norms cost half a matchTemplate of the window;
    # climbing from the best neighbour instead, 8-13 norms, was tried in issue 27: the error
    # against the object-free render grew by 0.004 on the validity scenes)
    y0, x0 = max(0, by - 2), max(0, bx - 2)
    ok = _allowed(integ[y0 : by + 3 + th, x0 : bx + 3 + tw], th, tw)
    y, x = by, bx
    for wy in range(y0, y0 + ok.shape[0]):
        for wx in range(x0, x0 + ok.shape[1]):
            if ok[wy - y0, wx - x0] and (wy, wx) != (by, bx):
                d = cv2.norm(img8[wy : wy + th, wx : wx + tw], ctx8, cv2.NORM_L2SQR, m8)
                if d < best:
                    best, y, x = d, wy, wx
    return y, x


def _exhaustive(imgf: np.ndarray, ctx: np.ndarray, rmask: np.ndarray, ok: np.ndarray) -> tuple[int, int] | None:
    """The best allowed offset over the whole image at full resolution (a small template)."""
    if not ok.any():
        return None
    ssd = np.where(ok, _ssd(imgf, ctx, cv2.merge([rmask] * ctx.shape[2])), np.inf)
    return np.unravel_index(int(np.argmin(ssd)), ssd.shape)


def _fill_piece(out: np.ndarray, src: _Source, todo: np.ndarray, piece: np.ndarray,
                min_ring: int, max_ring: int, surface_share: float) -> bool:
    """Fill one piece in ``out`` from its best-matching offset; False when no offset is allowed."""
    h, w = piece.shape
    area = cv2.countNonZero(piece)
    rp = min(max(round(0.3 * area**0.5), min_ring), max_ring)
    # the piece grown by the ring, on the crop that holds it (a 49 x 49 dilation of the whole
    # image was most of this function's own time; issue 27): the same pixels
    py0, py1, px0, px1 = bbox(piece)
    cy0, cx0 = max(0, py0 - rp - 1), max(0, px0 - rp - 1)
    crop = (slice(cy0, min(h, py1 + rp + 1)), slice(cx0, min(w, px1 + rp + 1)))
    pc = piece[crop]
    grown = cv2.dilate(pc, disk(rp))
    ring = cv2.bitwise_and(grown, cv2.bitwise_not(cv2.bitwise_or(todo[crop], pc)))
    n_ring = cv2.countNonZero(ring)
    if n_ring < 8:
        return False
    y0, y1, x0, x1 = bbox(grown)
    ring = ring[y0:y1, x0:x1]
    y0, y1, x0, x1 = y0 + cy0, y1 + cy0, x0 + cx0, x1 + cx0
    th, tw = y1 - y0, x1 - x0
    if th >= h or tw >= w:
        return False
    # an annotated object under much of the ring is the surface the piece lies on: allowed
    surface = None
    if src.n_obj > 1:
        on_ring = np.bincount(src.objs[y0:y1, x0:x1][ring > 0], minlength=src.n_obj)
        surface = on_ring > surface_share * n_ring
    # offsets whose box (piece + ring) touches the hole or a forbidden object are invalid: one
    # integral image answers every offset at once
    ctx = out[y0:y1, x0:x1].astype(np.float32)
    rmask = (ring > 0).astype(np.float32)
    found = _best_offset(src, ctx, rmask, src.blocked_integral(surface))
    if found is None:
        return False
    sy, sx = found
    patch = src.imgf[sy : sy + th, sx : sx + tw]
    # seam: spread the ring's mismatch inward (normalized convolution), add it to the copy
    sigma = max(2.0, 0.5 * rp)
    # the mismatch and its weight blurred as one four-channel image (one call, not two; at half
    # resolution it was 4% cheaper still, but the seam score grew by 0.001-0.002, issue 27);
    # what follows on the piece's box only, all that is written (issue 27, s28fill). Blurring
    # only the piece's columns in the second pass was tried: 1 ulp off GaussianBlur's floats on
    # a third of the boxes (the vectorized loop's tail falls on other columns)
    qy0, qy1, qx0, qx1 = py0 - y0, py1 - y0, px0 - x0, px1 - x0  # the piece's box in the box
    blurred = cv2.GaussianBlur(cv2.merge([*(a * rmask for a in cv2.split(ctx - patch)), rmask]), (0, 0), sigma)
    nd = cv2.split(blurred[qy0:qy1, qx0:qx1])
    den = np.maximum(nd[3], 1e-3)
    corr = cv2.merge([a / den for a in nd[:3]])
    patch = _to_u8(corr + patch[qy0:qy1, qx0:qx1])
    cv2.copyTo(patch, piece[py0:py1, px0:px1], out[py0:py1, px0:px1])  # in place, where the piece is
    return True

