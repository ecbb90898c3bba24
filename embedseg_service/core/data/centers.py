"""Object centres of a label image (docs/method.md §5).

Centres are returned in **array order** pixel index coordinates (``(y, x)`` or ``(z, y, x)``),
as float64. Distances used to pick a medoid are physical: the Z axis of a 3D image is scaled
by ``anisotropy`` (voxel_z / voxel_x).

* ``medoid`` (default): the object pixel with the least summed distance to all other pixels of
  the object. Exact. Objects of more than :data:`FFT_MIN_PIXELS` pixels whose bounding box is
  small enough get the summed distances of all their pixels at once as one FFT convolution of
  the object with the distance kernel; the few pixels within rounding of the minimum are then
  re-scored by exact pairwise sums (so ties resolve exactly as a brute-force medoid). Otherwise
  exact blocked pairwise sums (memory ``O(n * block)``); above :data:`EXACT_MEDOID_MAX_PIXELS`
  pixels the :data:`MEDOID_CANDIDATES` pixels nearest the coordinate-wise median are scored
  against a strided subsample of at most :data:`MEDOID_SUBSAMPLE` pixels.
* ``approximate_medoid``: the object pixel nearest the coordinate-wise median.
* ``centroid``: the rounded mean position (may fall outside a non-convex object).

Ties are broken towards the lowest (row-major) pixel index.
"""

from __future__ import annotations

import numpy as np
from scipy import fft as sfft
from scipy import ndimage
from scipy.spatial.distance import cdist

from embedseg_service.core.data.center_mode import CenterMode
from embedseg_service.core.data.labels import check_label_image

EXACT_MEDOID_MAX_PIXELS = 20_000
MEDOID_CANDIDATES = 4_096
MEDOID_SUBSAMPLE = 65_536
FFT_MIN_PIXELS = 256
FFT_MAX_ELEMENTS = 1 << 23  # largest FFT grid (>= 2 * bbox - 1 per axis) used for summed distances
_FFT_RTOL = 1e-4  # candidates within this of the (float32) FFT minimum are re-scored exactly
_BLOCK_ELEMENTS = 1 << 21  # distances held at once while summing (16 MiB of float64)
_TIE_RTOL = 1e-12
_MAX_DENSE_IDS = 1 << 24  # above this largest id, ids are compacted before find_objects


def _first_minimum(scores: np.ndarray) -> int:
    """Index of the first score equal (up to rounding) to the minimum."""
    best = scores.min()
    tol = _TIE_RTOL * max(abs(float(best)), 1.0)
    return int(np.flatnonzero(scores <= best + tol)[0])


def _summed_distances(points: np.ndarray, others: np.ndarray) -> np.ndarray:
    """For each row of ``points`` (n, D), the sum of Euclidean distances to ``others`` (m, D)."""
    n, m = len(points), len(others)
    block = max(1, min(n, _BLOCK_ELEMENTS // max(m, 1)))
    out = np.empty(n, dtype=np.float64)
    for start in range(0, n, block):
        out[start : start + block] = cdist(points[start : start + block], others).sum(axis=1)
    return out


def medoid(points: np.ndarray) -> int:
    """Row index of the medoid of ``points`` (n, D) float64 (physical coordinates).

    Exact for ``n <= EXACT_MEDOID_MAX_PIXELS``; above, the ``MEDOID_CANDIDATES`` points nearest
    the coordinate-wise median are scored against a strided subsample of ``<= MEDOID_SUBSAMPLE``
    points. Ties go to the lowest row index.
    """
    n = len(points)
    if n == 0:
        raise ValueError("medoid of an empty set of points")
    if n <= 2:
        return 0
    if n <= EXACT_MEDOID_MAX_PIXELS:
        return _first_minimum(_summed_distances(points, points))
    to_median = np.linalg.norm(points - np.median(points, axis=0), axis=1)
    candidates = np.sort(np.argsort(to_median, kind="stable")[:MEDOID_CANDIDATES])
    stride = -(-n // MEDOID_SUBSAMPLE)
    scores = _summed_distances(points[candidates], points[::stride])
    return int(candidates[_first_minimum(scores)])


def approximate_medoid(points: np.ndarray) -> int:
    """Row index of the point of ``points`` (n, D) nearest the coordinate-wise median."""
    if len(points) == 0:
        raise ValueError("approximate medoid of an empty set of points")
    to_median = np.linalg.norm(points - np.median(points, axis=0), axis=1)
    return _first_minimum(to_median)


def _physical_scale(dims: int, anisotropy: float) -> np.ndarray:
    if not (anisotropy > 0) or not np.isfinite(anisotropy):
        raise ValueError(f"anisotropy must be a positive finite number, got {anisotropy}")
    scale = np.ones(dims, dtype=np.float64)
    if dims == 3:
        scale[0] = anisotropy
    return scale


def grid_medoid(coords: np.ndarray, scale: np.ndarray) -> int:
    """Row index of the exact medoid of integer pixel coordinates ``coords`` (n, D), distances
    scaled per axis by ``scale`` (D,). Ties go to the lowest row index.

    Summed distances of all pixels come from one FFT convolution over the bounding box; pixels
    within rounding of the minimum are re-scored by exact pairwise sums. Falls back to
    :func:`medoid` when the FFT grid would exceed :data:`FFT_MAX_ELEMENTS`.
    """
    coords = np.asarray(coords)
    physical = coords * scale
    n = len(coords)
    if n < FFT_MIN_PIXELS:
        return medoid(physical)
    lo = coords.min(axis=0).astype(np.int64)
    local = coords.astype(np.int64) - lo
    box = local.max(axis=0) + 1
    if int(np.prod(2 * box - 1)) > FFT_MAX_ELEMENTS:
        return medoid(physical)
    # Circular convolution of length >= 2 * box - 1 per axis: no wrap-around reaches the
    # outputs read back (pixel p sits at p + box - 1). float32 is ample for picking candidates.
    occupied = np.zeros(tuple(box), dtype=np.float32)
    occupied[tuple(local.T)] = 1.0
    offsets = np.meshgrid(*[np.arange(-(b - 1), b) * s for b, s in zip(box, scale)], indexing="ij")
    kernel = np.sqrt(sum(o * o for o in offsets)).astype(np.float32)
    lengths = [sfft.next_fast_len(int(2 * b - 1), real=True) for b in box]
    spectrum = sfft.rfftn(occupied, s=lengths) * sfft.rfftn(kernel, s=lengths)
    energy = sfft.irfftn(spectrum, s=lengths)[tuple((local + (box - 1)).T)].astype(np.float64)
    best = energy.min()
    candidates = np.flatnonzero(energy <= best + _FFT_RTOL * max(abs(float(best)), 1.0))
    exact = _summed_distances(physical[candidates], physical)
    return int(candidates[_first_minimum(exact)])


def center_of_points(
    coords: np.ndarray, mode: CenterMode | str = CenterMode.medoid, anisotropy: float = 1.0
) -> np.ndarray:
    """Centre (D,) float64 of one object given its pixel coordinates ``coords`` (n, D) in array order.

    ``coords`` must be in row-major order for ties to go to the lowest pixel index; integer
    coordinates allow the FFT medoid (:func:`grid_medoid`).
    """
    mode = CenterMode.parse(mode)
    coords = np.asarray(coords)
    values = coords.astype(np.float64)
    if mode is CenterMode.centroid:
        return np.round(values.mean(axis=0))
    scale = _physical_scale(coords.shape[1], anisotropy)
    if mode is CenterMode.approximate_medoid:
        return values[approximate_medoid(values * scale)].copy()
    if np.issubdtype(coords.dtype, np.integer):
        return values[grid_medoid(coords, scale)].copy()
    return values[medoid(values * scale)].copy()


def object_centers(
    labels: np.ndarray,
    mode: CenterMode | str = CenterMode.medoid,
    anisotropy: float = 1.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Ids and centres of all objects of ``labels``.

    Args:
        labels: (Y, X) or (Z, Y, X) integer array, 0 = background.
        mode: a :class:`CenterMode`.
        anisotropy: voxel_z / voxel_x; scales Z distances of 3D images (medoid modes).

    Returns:
        ``ids`` int64 (K,) ascending and ``centers`` float64 (K, D), array-order pixel coordinates.
    """
    mode = CenterMode.parse(mode)
    labels = check_label_image(labels)
    dims = labels.ndim
    _physical_scale(dims, anisotropy)
    if labels.size == 0:
        return np.zeros(0, dtype=np.int64), np.zeros((0, dims), dtype=np.float64)
    max_id = int(labels.max())
    if max_id == 0:
        return np.zeros(0, dtype=np.int64), np.zeros((0, dims), dtype=np.float64)
    if max_id > _MAX_DENSE_IDS:
        present, compact = np.unique(labels, return_inverse=True)
        compact = compact.reshape(labels.shape)
        if present[0] != 0:
            present = np.concatenate([[0], present])
            compact = compact + 1
        search, id_of = compact, present
    else:
        search, id_of = labels, None
    ids: list[int] = []
    centers: list[np.ndarray] = []
    for index, slc in enumerate(ndimage.find_objects(search)):
        if slc is None:
            continue
        value = index + 1
        local = np.nonzero(search[slc] == value)
        offset = np.array([s.start for s in slc], dtype=np.int64)
        coords = np.stack(local, axis=1).astype(np.int64) + offset
        centers.append(center_of_points(coords, mode, anisotropy))
        ids.append(int(id_of[value]) if id_of is not None else value)
    return np.asarray(ids, dtype=np.int64), np.stack(centers).astype(np.float64)
