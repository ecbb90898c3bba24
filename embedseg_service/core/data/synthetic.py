"""Deterministic synthetic label images, images and ideal network outputs (for tests and benchmarks).

Every generator takes a ``seed`` and returns the same arrays for the same arguments.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from embedseg_service.core.model.embedding import normalize_step

RadiusRange = tuple[float, float] | Sequence[tuple[float, float]]


def _radius_ranges(radius: RadiusRange, dims: int) -> list[tuple[float, float]]:
    """Per-axis (min, max) semi-axis ranges in array order."""
    numbers = [r for r in radius if isinstance(r, (int, float))]
    if len(radius) == 2 and len(numbers) == 2:
        pairs = [(float(numbers[0]), float(numbers[1]))] * dims
    else:
        pairs = [(float(lo), float(hi)) for lo, hi in radius]  # type: ignore[misc]
        if len(pairs) != dims:
            raise ValueError(f"radius needs one (min, max) pair per axis ({dims}), got {len(pairs)}")
    for lo, hi in pairs:
        if not (0 < lo <= hi):
            raise ValueError(f"radius ranges must satisfy 0 < min <= max, got {pairs}")
    return pairs


def random_labels(
    shape: Sequence[int],
    n_objects: int,
    radius: RadiusRange = (4.0, 8.0),
    seed: int = 0,
    *,
    gap: int = 2,
    max_tries: int = 200,
) -> np.ndarray:
    """Label image of ``n_objects`` non-overlapping, axis-aligned ellipses (2D) or ellipsoids (3D).

    ``shape`` is ``(Y, X)`` or ``(Z, Y, X)``; ``radius`` is a ``(min, max)`` range of semi-axes in
    pixels, applied to every axis, or one such pair per axis in array order. Objects lie wholly
    inside the image and are separated by at least ``gap`` background pixels. Labels run
    ``1..n_objects`` in placement order. Returns an int32 array of ``shape``.
    Raises ``ValueError`` when the objects cannot be placed.
    """
    shape = tuple(int(s) for s in shape)
    dims = len(shape)
    if dims not in (2, 3):
        raise ValueError(f"shape must be (Y, X) or (Z, Y, X), got {shape}")
    if n_objects < 0:
        raise ValueError(f"n_objects must be >= 0, got {n_objects}")
    ranges = _radius_ranges(radius, dims)
    rng = np.random.default_rng(seed)
    labels = np.zeros(shape, dtype=np.int32)
    occupied = np.zeros(shape, dtype=bool)  # objects grown by ``gap``
    for label in range(1, n_objects + 1):
        for _ in range(max_tries):
            semi = np.array([rng.uniform(lo, hi) for lo, hi in ranges])
            ext = np.ceil(semi).astype(int)
            if np.any(2 * ext + 1 > np.array(shape)):
                continue
            centre = np.array([rng.uniform(e, s - 1 - e) for e, s in zip(ext, shape)])
            lo = np.maximum(np.floor(centre - semi - gap).astype(int), 0)
            hi = np.minimum(np.ceil(centre + semi + gap).astype(int) + 1, shape)
            grids = np.meshgrid(*[np.arange(a, b) for a, b in zip(lo, hi)], indexing="ij")
            rho = sum(((g - c) / r) ** 2 for g, c, r in zip(grids, centre, semi))
            grown = sum(((g - c) / (r + gap)) ** 2 for g, c, r in zip(grids, centre, semi)) <= 1.0
            inside = rho <= 1.0
            window = tuple(slice(a, b) for a, b in zip(lo, hi))
            if not inside.any() or np.any(occupied[window] & grown):
                continue
            labels[window][inside] = label
            occupied[window] |= grown
            break
        else:
            raise ValueError(
                f"could not place object {label} of {n_objects} in shape {shape} after {max_tries} tries; "
                "ask for fewer or smaller objects, or a smaller gap"
            )
    return labels


def render_image(labels: np.ndarray, seed: int = 0, noise: float = 0.05) -> np.ndarray:
    """Float32 image of ``labels`` (same shape): per-object brightness in [0.5, 1] on a 0.1
    background, blurred by one pixel, plus Gaussian noise of standard deviation ``noise``."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    n = int(labels.max()) if labels.size else 0
    brightness = np.concatenate([[0.1], rng.uniform(0.5, 1.0, size=n)])
    image = brightness[np.clip(labels, 0, None)]
    image = ndimage.gaussian_filter(image, sigma=1.0)
    if noise > 0:
        image = image + rng.normal(0.0, noise, size=image.shape)
    return image.astype(np.float32)


NUCLEUS_RADIUS_3D: tuple[tuple[float, float], ...] = ((1.5, 2.5), (34.0, 46.0), (34.0, 46.0))
"""Default semi-axis ranges (Z, Y, X) of :func:`touching_nuclei_labels`, in voxels: nuclei 68-92 px
wide that cover 3-5 slices, as adherent nuclei imaged with voxels of about 1.0 x 0.2 x 0.2 um."""


def _place_touching(
    rng: np.random.Generator,
    shape: tuple[int, int, int],
    n_objects: int,
    ranges: list[tuple[float, float]],
    overlap: tuple[float, float],
    isolated: float,
    max_tries: int,
) -> list[tuple[np.ndarray, np.ndarray, float]]:
    """Centres ``(z, y, x)``, semi-axes ``(z, y, x)`` and YX angles of nuclei that overlap their neighbours."""
    placed: list[tuple[np.ndarray, np.ndarray, float]] = []
    size = np.array(shape[1:], dtype=float)
    for k in range(n_objects):
        for _ in range(max_tries):
            semi = np.array([rng.uniform(lo, hi) for lo, hi in ranges])
            angle = rng.uniform(0.0, math.pi)
            r = semi[1:].mean()
            alone = k == 0 or rng.random() < isolated
            if alone:
                yx = rng.uniform(0.5 * r, size - 1 - 0.5 * r)
            else:
                centre, other, _ = placed[int(rng.integers(k))]
                theta = rng.uniform(0.0, 2 * math.pi)
                dist = (1.0 - rng.uniform(*overlap)) * (r + other[1:].mean())
                yx = centre[1:] + dist * np.array([math.sin(theta), math.cos(theta)])
            if np.any(yx < 0.5 * r) or np.any(yx > size - 1 - 0.5 * r):
                continue  # centres stay inside, so that at most about half a nucleus is cut off
            # (centre distance, summed mean radii) to every placed nucleus
            pairs = [(float(np.hypot(*(yx - c[1:]))), r + s[1:].mean()) for c, s, _ in placed]
            if any(d < (1.0 - overlap[1]) * rr for d, rr in pairs) or (alone and any(d < rr + 2.0 for d, rr in pairs)):
                continue
            z = (shape[0] - 1) / 2.0 + rng.uniform(-0.5, 0.5)
            placed.append((np.array([z, *yx]), semi, angle))
            break
        else:
            raise ValueError(
                f"could not place nucleus {k + 1} of {n_objects} in shape {shape} after {max_tries} tries; "
                "ask for fewer or smaller nuclei, or a larger image"
            )
    return placed


def touching_nuclei_labels(
    shape: Sequence[int] = (5, 192, 192),
    n_objects: int = 6,
    radius: Sequence[tuple[float, float]] = NUCLEUS_RADIUS_3D,
    seed: int = 0,
    *,
    overlap: tuple[float, float] = (0.05, 0.25),
    isolated: float = 0.15,
    max_tries: int = 2000,
) -> np.ndarray:
    """Label image ``(Z, Y, X)`` int32 of ``n_objects`` flattened ellipsoidal nuclei, most touching a neighbour.

    A stand-in for few-slice confocal stacks with strongly anisotropic voxels (see
    :data:`NUCLEUS_RADIUS_3D`). ``radius`` is one ``(min, max)`` semi-axis range per axis in voxels, array
    order; each nucleus is turned by a random angle in the YX plane and centred within half a voxel of
    the middle slice. A nucleus is placed next to a random earlier one, its outline reaching into it by
    a fraction in ``overlap`` of their summed mean YX radii (never more than ``overlap[1]`` into any
    other); with probability ``isolated`` (and for the first) it is placed anywhere at least 2 px away
    from the others. Voxels inside several outlines go to the nucleus with the smallest normalised
    ellipsoidal distance, so neighbours share a boundary with no background between them; each nucleus
    keeps its largest connected part. Centres lie inside the image, outlines may be cut by its border.
    Labels run ``1..n_objects``. Raises ``ValueError`` when the nuclei cannot be placed.
    """
    if len(shape) != 3:
        raise ValueError(f"shape must be (Z, Y, X), got {tuple(shape)}")
    shape3 = (int(shape[0]), int(shape[1]), int(shape[2]))
    if n_objects < 1:
        raise ValueError(f"n_objects must be >= 1, got {n_objects}")
    if not (0.0 <= overlap[0] <= overlap[1] < 1.0):
        raise ValueError(f"overlap must satisfy 0 <= min <= max < 1, got {overlap}")
    ranges = _radius_ranges(radius, 3)
    rng = np.random.default_rng(seed)
    placed = _place_touching(rng, shape3, n_objects, ranges, overlap, isolated, max_tries)
    zz, yy, xx = np.meshgrid(*[np.arange(s, dtype=np.float64) for s in shape3], indexing="ij")
    best = np.full(shape3, np.inf)
    labels = np.zeros(shape3, dtype=np.int32)
    for k, (centre, semi, angle) in enumerate(placed, start=1):
        dy, dx = yy - centre[1], xx - centre[2]
        u = dy * math.cos(angle) + dx * math.sin(angle)
        v = -dy * math.sin(angle) + dx * math.cos(angle)
        rho = ((zz - centre[0]) / semi[0]) ** 2 + (u / semi[1]) ** 2 + (v / semi[2]) ** 2
        closer = (rho <= 1.0) & (rho < best)
        labels[closer] = k
        best[closer] = rho[closer]
    for k in range(1, n_objects + 1):
        parts, count = ndimage.label(labels == k)
        if count > 1:
            keep = 1 + int(np.argmax(np.bincount(parts.ravel())[1:]))
            labels[(parts > 0) & (parts != keep)] = 0
    return labels


def render_confocal(
    labels: np.ndarray,
    seed: int = 0,
    *,
    brightness: tuple[float, float] = (0.6, 1.0),
    texture: float = 0.15,
    boundary_dim: float = 0.3,
    background: float = 0.25,
    unevenness: float = 0.8,
    blur: Sequence[float] = (0.8, 1.0, 1.0),
    photons: float = 3000.0,
    read_noise: float = 0.7,
    gray_per_unit: float = 50.0,
    offset: float = 5.0,
) -> np.ndarray:
    """uint8 confocal-like stack of ``labels`` ``(Z, Y, X)`` (same shape), with an uneven background.

    Each nucleus gets a brightness drawn from ``brightness`` (in units of 1) modulated by a smooth
    chromatin texture of relative amplitude ``texture``; voxels on a boundary between two nuclei are
    dimmed by ``boundary_dim``. The background (``background`` on average) varies in YX by a linear
    ramp in a random direction plus smooth blotches (together of relative amplitude about
    ``unevenness``). The sum is blurred by a Gaussian of ``blur`` voxels per axis (the Z value models
    the axial spread that carries light into neighbouring slices), then gets Poisson noise for
    ``photons`` photons per unit of brightness and Gaussian read noise of ``read_noise`` gray levels, and
    is stored as ``offset + gray_per_unit * value`` clipped to 0..255.
    """
    labels = np.asarray(labels)
    if labels.ndim != 3:
        raise ValueError(f"labels must be (Z, Y, X), got shape {labels.shape}")
    rng = np.random.default_rng(seed)
    _, ny, nx = labels.shape
    n = int(labels.max()) if labels.size else 0
    level = np.concatenate([[0.0], rng.uniform(brightness[0], brightness[1], size=n)])
    chromatin = ndimage.gaussian_filter(rng.normal(size=labels.shape), (0.5, 4.0, 4.0))
    chromatin /= chromatin.std() or 1.0
    nuclei = level[np.clip(labels, 0, None)] * (1.0 + texture * chromatin)
    shared = np.zeros(labels.shape, dtype=bool)
    for axis in (1, 2):
        a, b = np.moveaxis(labels, axis, 0)[1:], np.moveaxis(labels, axis, 0)[:-1]
        edge = (a != b) & (a > 0) & (b > 0)
        view = np.moveaxis(shared, axis, 0)
        view[1:] |= edge
        view[:-1] |= edge
    nuclei[shared] *= 1.0 - boundary_dim
    yy, xx = np.mgrid[0:ny, 0:nx] / float(max(ny, nx))
    theta = rng.uniform(0.0, 2 * math.pi)
    ramp = yy * math.sin(theta) + xx * math.cos(theta)
    blotches = ndimage.gaussian_filter(rng.normal(size=(ny, nx)), 0.1 * max(ny, nx))
    blotches /= np.abs(blotches).max() or 1.0
    field = 1.0 + unevenness * (ramp - ramp.mean() + 0.6 * blotches)
    signal = nuclei + background * np.clip(field, 0.2, None)[None]
    signal = ndimage.gaussian_filter(signal, [float(b) for b in blur])
    noisy = rng.poisson(np.clip(signal, 0.0, None) * photons) / photons
    gray = offset + gray_per_unit * noisy + rng.normal(0.0, read_noise, size=labels.shape)
    return np.clip(np.round(gray), 0, 255).astype(np.uint8)


def anisotropic_nuclei_stack(
    shape: Sequence[int] = (5, 192, 192),
    n_objects: int = 6,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """``(image, labels)``: a few-slice stack of touching nuclei with voxels of about 1.0 x 0.2 x 0.2 um.

    :func:`touching_nuclei_labels` then :func:`render_confocal` with their defaults, both seeded by
    ``seed``: ``image`` uint8 and ``labels`` int32, both ``shape`` ``(Z, Y, X)``. Otsu thresholding
    with connected components merges most touching nuclei on such stacks.
    """
    labels = touching_nuclei_labels(shape, n_objects, seed=seed)
    return render_confocal(labels, seed=seed), labels


def object_geometry(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-label ``(ids, centroids, half_extents)`` of the objects of ``labels``.

    ``ids`` (K,) are the labels present (> 0); ``centroids`` (K, D) are mean pixel indices in array
    order; ``half_extents`` (K, D) are half the bounding-box sizes in pixels (>= 0.5).
    """
    labels = np.asarray(labels)
    ids = np.unique(labels)
    ids = ids[ids > 0]
    dims = labels.ndim
    if ids.size == 0:
        return ids, np.zeros((0, dims)), np.zeros((0, dims))
    index = np.where(labels > 0, np.searchsorted(ids, labels) + 1, 0)  # 0 background, k + 1 for object k
    counts = np.bincount(index.ravel(), minlength=ids.size + 1)[1:]
    coords = np.indices(labels.shape)
    centroids = np.stack(
        [np.bincount(index.ravel(), weights=c.ravel(), minlength=ids.size + 1)[1:] / counts for c in coords], axis=1
    )
    half = np.zeros((ids.size, dims))
    for k, sl in enumerate(ndimage.find_objects(index)):
        if sl is not None:
            half[k] = [(s.stop - s.start) / 2.0 for s in sl]
    return ids, centroids, half


def perfect_raw(
    labels: np.ndarray,
    step: float | Sequence[float],
    *,
    seed_max: float = 6.0,
    seed_edge: float = 1.0,
    seed_background: float = -10.0,
    bandwidth: float = 1.0,
    background_sigma: float | None = None,
    offset_noise: float = 0.0,
    sigma_noise: float = 0.0,
    seed_noise: float = 0.0,
    background_seed_noise: float | None = None,
    seed: int = 0,
) -> np.ndarray:
    """Ideal EmbedSeg raw output ``(2D + 1, *S)`` float32 for ``labels`` (``(Y, X)`` or ``(Z, Y, X)``).

    Channels follow the network layout: offsets x, y[, z]; sigma x, y[, z]; seed logit.

    * offsets: ``atanh`` of (object centroid - pixel index) * step, so every object pixel embeds at its
      object's centroid; background offsets are 0 (pixels embed at their own coordinate);
    * sigma: ``ln(lambda_a) / 10`` with ``lambda_a = ln 2 / (bandwidth * (half_extent_a + 0.5) * h_a)**2``, the
      0.5 level of the Gaussian on the object's bounding ellipsoid; background gets ``background_sigma``
      (default: the median object value);
    * seed logit: ``seed_max`` at the centroid falling quadratically (in normalised ellipsoidal distance) to
      ``seed_edge`` at the object's edge; ``seed_background`` on background.

    Noise (seeded by ``seed``): ``offset_noise`` moves each embedding by a Gaussian of that many pixels per
    axis, ``sigma_noise`` and ``seed_noise`` add Gaussians to the raw sigma and to the seed logit of object
    pixels; ``background_seed_noise`` (default ``seed_noise``) to the background seed logit.
    """
    labels = np.asarray(labels)
    dims = labels.ndim
    if dims not in (2, 3):
        raise ValueError(f"labels must be (Y, X) or (Z, Y, X), got shape {labels.shape}")
    h = np.array(normalize_step(step, dims))
    rng = np.random.default_rng(seed)
    ids, centroids, half = object_geometry(labels)
    lookup = np.zeros(int(labels.max()) + 1 if labels.size else 1, dtype=np.int64)
    lookup[ids] = np.arange(1, ids.size + 1)
    index = lookup[np.clip(labels, 0, None)]  # 0 background, k+1 for object k
    fg = index > 0
    k = index - 1
    coords = np.indices(labels.shape).astype(np.float64)

    radius = bandwidth * (half + 0.5)  # pixels, (K, D)
    lam = np.log(2.0) / (radius * h) ** 2 if ids.size else np.ones((0, dims))
    s_obj = np.log(lam) / 10.0
    if background_sigma is not None:
        s_bg = np.full(dims, float(background_sigma))
    else:
        s_bg = np.median(s_obj, axis=0) if ids.size else np.zeros(dims)

    raw = np.zeros((2 * dims + 1, *labels.shape), dtype=np.float64)
    rho2 = np.zeros(labels.shape)
    for a in range(dims):
        disp = np.where(fg, centroids[k.clip(0), a] - coords[a], 0.0)
        if offset_noise > 0:
            disp = disp + rng.normal(0.0, offset_noise, size=labels.shape)
        raw[dims - 1 - a] = np.arctanh(np.clip(disp * h[a], -1 + 1e-6, 1 - 1e-6))
        sig = np.where(fg, s_obj[k.clip(0), a] if ids.size else 0.0, s_bg[a])
        if sigma_noise > 0:
            sig = sig + rng.normal(0.0, sigma_noise, size=labels.shape)
        raw[dims + dims - 1 - a] = sig
        if ids.size:
            rho2 += np.where(fg, ((coords[a] - centroids[k.clip(0), a]) / (half[k.clip(0), a] + 0.5)) ** 2, 0.0)
    q = np.where(fg, seed_max - (seed_max - seed_edge) * np.minimum(rho2, 1.0), seed_background)
    bg_noise = seed_noise if background_seed_noise is None else background_seed_noise
    if seed_noise > 0 or bg_noise > 0:
        z = rng.normal(0.0, 1.0, size=labels.shape)
        q = q + z * np.where(fg, seed_noise, bg_noise)
    raw[2 * dims] = q
    return raw.astype(np.float32)
