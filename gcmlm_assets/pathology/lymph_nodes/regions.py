"""One lymph-node slide's nodes and tumour regions (plain numpy, OpenCV and SciPy; no Dagster).

* Nodes are the slide's tissue components, as the tiling's own segmentation found them
  (slide_geojson.slide_tissue_polygons gives them in level-0 px); components under
  `min_node_area_mm2` are debris. Node ids run 1..K in the order of their bounding boxes' (y, x).
* Tumour patches are patches whose probability is at least `tumour_threshold`; they are joined
  into regions on the patch grid (8-connectivity), and a region of fewer than
  `min_tumour_patches` patches is dropped as noise.
* Areas are counted on one raster per slide whose cell is 1/`RASTER_CELLS_PER_PATCH` of the
  patch side (8 µm for 256 px patches at 0.5 µm/px: the tiling's default segmentation
  resolution, so the raster is as fine as the node outlines are). A patch square covers whole
  cells, a node covers the cells whose centres its outline contains.
* A patch belongs to the node whose cells hold its centre (node 0: outside every node). A node's
  tumour area is its own cells under the squares of the kept tumour patches that belong to it:
  a patch never lends tumour to a neighbouring node its square overlaps, a node is metastatic only
  when one of its own patches is tumour, and tumour never exceeds its node's area (T/MLN <= 1 by
  construction).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from gcmlm_assets.lazy import lazy

cv2 = lazy("cv2")
np = lazy("numpy")
ndimage = lazy("scipy.ndimage")

RASTER_CELLS_PER_PATCH = 16
# A huge slide tiled with tiny patches gets coarser cells rather than a raster of this many cells.
MAX_RASTER_CELLS = 64_000_000
SUBPIXEL_BITS = 4  # cv2.fillPoly's `shift`: outlines placed to 1/16 of a cell


def polygon_area(outer, holes=()) -> float:
    """Area of a polygon with holes (shoelace formula), in the points' units squared."""
    def ring_area(points) -> float:
        ring = np.asarray(points, np.float64).reshape(-1, 2)
        x, y = ring[:, 0], ring[:, 1]
        return abs(0.5 * float(np.dot(x, np.roll(y, -1)) - np.dot(np.roll(x, -1), y)))

    return max(0.0, ring_area(outer) - sum(ring_area(hole) for hole in holes))


def mm2_per_px(mpp) -> float:
    """Level-0 px² -> mm², from the slide's (x, y) µm per px."""
    return float(mpp[0]) * float(mpp[1]) * 1e-6


@dataclass(frozen=True)
class NodeOutline:
    """A node's outline in level-0 px: the outer ring (K, 2), its holes, its bbox (x0, y0, x1, y1)."""

    outer: np.ndarray
    holes: list
    bbox: tuple[float, float, float, float]


def node_outlines(tissue_polygons, mpp, min_node_area_mm2: float) -> list[NodeOutline]:
    """The slide's tissue components [(outer, holes)] (level-0 px) of at least `min_node_area_mm2`
    (outline area, holes subtracted), ordered by the (y, x) of their bounding boxes' top-left corner."""
    scale = mm2_per_px(mpp)
    outlines = []
    for outer, holes in tissue_polygons:
        outer = np.asarray(outer, np.float64).reshape(-1, 2)
        holes = [np.asarray(hole, np.float64).reshape(-1, 2) for hole in holes]
        if len(outer) < 3 or polygon_area(outer, holes) * scale < min_node_area_mm2:
            continue
        x0, y0 = outer.min(axis=0)
        x1, y1 = outer.max(axis=0)
        outlines.append(NodeOutline(outer, holes, (float(x0), float(y0), float(x1), float(y1))))
    return sorted(outlines, key=lambda node: (node.bbox[1], node.bbox[0]))


# ---------------------------------------------------------------- raster


@dataclass(frozen=True)
class SlideRaster:
    """Cells of `cell` level-0 px from the slide's top-left corner: cell (r, c) covers level-0
    [c * cell, (c + 1) * cell) x [r * cell, (r + 1) * cell)."""

    cell: float
    shape: tuple[int, int]  # rows, columns

    def to_level0(self, points):
        """Cell coordinates (a cell's centre is at its index) -> level-0 px."""
        return (np.asarray(points, np.float64) + 0.5) * self.cell

    def fill(self, image, rings, value: int) -> None:
        """Set the cells whose centres lie inside `rings` (level-0 px) to `value`."""
        scaled = [np.round((np.asarray(ring, np.float64).reshape(-1, 2) / self.cell - 0.5) * (1 << SUBPIXEL_BITS))
                  .astype(np.int32).reshape(-1, 1, 2) for ring in rings]
        if scaled:
            cv2.fillPoly(image, scaled, int(value), lineType=cv2.LINE_8, shift=SUBPIXEL_BITS)

    def span(self, start: float, length: float, limit: int) -> tuple[int, int]:
        """The cells [lo, hi) of the level-0 interval [start, start + length)."""
        lo = int(np.clip(np.round(start / self.cell), 0, limit))
        hi = int(np.clip(np.round((start + length) / self.cell), lo, limit))
        return lo, hi


def slide_raster(dimensions, side_level0: float) -> SlideRaster:
    width, height = (float(v) for v in dimensions)
    cell = float(side_level0) / RASTER_CELLS_PER_PATCH
    cell = max(cell, float(np.sqrt(width * height / MAX_RASTER_CELLS)))
    return SlideRaster(cell, (max(1, int(np.ceil(height / cell))), max(1, int(np.ceil(width / cell)))))


def node_label_image(outlines: list[NodeOutline], raster: SlideRaster):
    """int32 cells: the id (1-based index in `outlines`) of the node covering each, 0 elsewhere.
    Largest first, each with its holes cut, so a node lying in another's hole keeps its cells."""
    labels = np.zeros(raster.shape, np.int32)
    order = sorted(range(len(outlines)), key=lambda i: polygon_area(outlines[i].outer), reverse=True)
    for index in order:
        raster.fill(labels, [outlines[index].outer], index + 1)
        if outlines[index].holes:
            raster.fill(labels, outlines[index].holes, 0)
    return labels


# ---------------------------------------------------------------- tumour patches


def grid_positions(coords, side_level0: float):
    """(row, column) of each patch on the patch grid: the corners are whole multiples of the grid
    step up to the flooring of a fractional step, which rounding undoes."""
    coords = np.asarray(coords, np.float64).reshape(-1, 2)
    return (np.round(coords[:, 1] / side_level0).astype(np.int64),
            np.round(coords[:, 0] / side_level0).astype(np.int64))


def tumour_regions_on_grid(coords, side_level0: float, is_tumour, min_patches: int):
    """(N,) int64: the tumour region (1..R) of each patch, 0 for a patch outside every kept region.
    Regions are 8-connected tumour patches on the grid; those of fewer than `min_patches` patches
    are dropped."""
    is_tumour = np.asarray(is_tumour, bool).reshape(-1)
    regions = np.zeros(len(is_tumour), np.int64)
    if not is_tumour.any():
        return regions
    rows, columns = grid_positions(coords, side_level0)
    rows, columns = rows[is_tumour], columns[is_tumour]
    row0, column0 = rows.min(), columns.min()
    grid = np.zeros((int(rows.max() - row0) + 1, int(columns.max() - column0) + 1), bool)
    grid[rows - row0, columns - column0] = True
    labels, _ = ndimage.label(grid, structure=np.ones((3, 3), bool))
    found = labels[rows - row0, columns - column0]
    sizes = np.bincount(found)
    kept = np.flatnonzero(sizes >= min_patches)
    kept = kept[kept > 0]
    renumber = np.zeros(len(sizes), np.int64)
    renumber[kept] = np.arange(1, len(kept) + 1)
    regions[np.flatnonzero(is_tumour)] = renumber[found]
    return regions


# ---------------------------------------------------------------- one slide


@dataclass
class Node:
    id: int
    outer: np.ndarray  # level-0 px
    holes: list
    bbox: tuple[float, float, float, float]
    area_mm2: float
    tumour_area_mm2: float
    n_patches: int
    n_tumour_patches: int

    @property
    def metastatic(self) -> bool:
        return self.tumour_area_mm2 > 0


@dataclass
class TumourRegion:
    """One 8-connected piece of tumour inside one node, outlined in level-0 px."""

    node_id: int
    outer: np.ndarray
    holes: list
    area_mm2: float


@dataclass
class SlideNodes:
    name: str
    mpp: tuple[float, float]
    dimensions: tuple[int, int]
    patch_side_level0: float
    raster_cell_level0: float
    nodes: list[Node]
    tumour_regions: list[TumourRegion]
    coords: np.ndarray  # (N, 2) int64 level-0 patch corners
    probabilities: np.ndarray  # (N,) float64
    patch_node_ids: np.ndarray  # (N,) int64, 0 outside every node
    tumour_patch: np.ndarray  # (N,) bool: in a kept tumour region
    n_above_threshold: int  # patches at or above the threshold, before small regions are dropped
    extra: dict = field(default_factory=dict)

    @property
    def n_nodes(self) -> int:
        return len(self.nodes)

    @property
    def n_metastatic_nodes(self) -> int:
        return sum(node.metastatic for node in self.nodes)

    @property
    def tumour_area_mm2(self) -> float:
        return float(sum(node.tumour_area_mm2 for node in self.nodes))

    @property
    def metastatic_node_area_mm2(self) -> float:
        return float(sum(node.area_mm2 for node in self.nodes if node.metastatic))


def analyse_slide(name: str, tissue_polygons, coords, probabilities, *, mpp, dimensions, side_level0: float,
                  tumour_threshold: float, min_tumour_patches: int, min_node_area_mm2: float) -> SlideNodes:
    """One slide's nodes and tumour regions from its tissue polygons [(outer, holes)] (level-0 px),
    its patch corners `coords` (N, 2) level-0 with side `side_level0`, and each patch's tumour
    probability (N,)."""
    coords = np.asarray(coords, np.int64).reshape(-1, 2)
    probabilities = np.asarray(probabilities, np.float64).reshape(-1)
    if len(probabilities) != len(coords):
        raise ValueError(f"{name}: {len(probabilities)} probabilities for {len(coords)} patches")
    side = float(side_level0)
    outlines = node_outlines(tissue_polygons, mpp, min_node_area_mm2)
    raster = slide_raster(dimensions, side)
    labels = node_label_image(outlines, raster)
    n_rows, n_columns = raster.shape

    above = probabilities >= tumour_threshold
    grid_regions = tumour_regions_on_grid(coords, side, above, min_tumour_patches) if len(coords) else \
        np.zeros(0, np.int64)
    tumour_patch = grid_regions > 0

    centre_rows = np.clip(((coords[:, 1] + side / 2) // raster.cell).astype(np.int64), 0, n_rows - 1)
    centre_columns = np.clip(((coords[:, 0] + side / 2) // raster.cell).astype(np.int64), 0, n_columns - 1)
    patch_node_ids = labels[centre_rows, centre_columns].astype(np.int64) if len(coords) else np.zeros(0, np.int64)

    # A tumour patch gives tumour only to the node holding its centre, and only that node's cells
    # under its square: a square reaching over a neighbouring node's edge leaves that node clean.
    tumour_cells = np.zeros(raster.shape, bool)
    for (x, y), node_id in zip(coords[tumour_patch].tolist(), patch_node_ids[tumour_patch].tolist()):
        if node_id == 0:
            continue
        r0, r1 = raster.span(y, side, n_rows)
        c0, c1 = raster.span(x, side, n_columns)
        tumour_cells[r0:r1, c0:c1] |= labels[r0:r1, c0:c1] == node_id

    k = len(outlines)
    cell_mm2 = raster.cell * raster.cell * mm2_per_px(mpp)
    node_cells = np.bincount(labels.ravel(), minlength=k + 1)
    node_tumour_cells = np.bincount(labels[tumour_cells], minlength=k + 1)
    node_patches = np.bincount(patch_node_ids, minlength=k + 1)
    node_tumour_patches = np.bincount(patch_node_ids[tumour_patch], minlength=k + 1)
    nodes = [Node(index + 1, outline.outer, outline.holes, outline.bbox, float(node_cells[index + 1] * cell_mm2),
                  float(node_tumour_cells[index + 1] * cell_mm2), int(node_patches[index + 1]),
                  int(node_tumour_patches[index + 1])) for index, outline in enumerate(outlines)]
    regions = [region for node in nodes if node.tumour_area_mm2 > 0
               for region in _tumour_outlines(node, labels, tumour_cells, raster, cell_mm2, dimensions)]
    return SlideNodes(name, (float(mpp[0]), float(mpp[1])), (int(dimensions[0]), int(dimensions[1])), side,
                      raster.cell, nodes, regions, coords, probabilities, patch_node_ids, tumour_patch,
                      int(above.sum()))


def _tumour_outlines(node: Node, labels, tumour_cells, raster: SlideRaster, cell_mm2: float,
                     dimensions) -> list[TumourRegion]:
    """Each 8-connected piece of the node's tumour cells, outlined through its edge cells' centres."""
    x0, y0, x1, y1 = node.bbox  # the node's cells have their centres inside its outline, so in here
    r0, r1 = int(y0 // raster.cell), int(y1 // raster.cell) + 1
    c0, c1 = int(x0 // raster.cell), int(x1 // raster.cell) + 1
    window = (slice(r0, r1), slice(c0, c1))
    mask = ((labels[window] == node.id) & tumour_cells[window]).astype(np.uint8)
    n, pieces, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    limit = np.asarray(dimensions, np.float64)
    offset = np.array([c0, r0], np.float64)

    def level0(contour):
        return np.clip(raster.to_level0(contour.reshape(-1, 2) + offset), 0.0, limit)

    regions = []
    for piece in range(1, n):
        contours, hierarchy = cv2.findContours((pieces == piece).astype(np.uint8), cv2.RETR_CCOMP,
                                               cv2.CHAIN_APPROX_SIMPLE)
        outer = [i for i in range(len(contours)) if hierarchy[0][i][3] < 0]
        if not outer:
            continue
        holes = [level0(contours[i]) for i in range(len(contours)) if hierarchy[0][i][3] == outer[0]]
        regions.append(TumourRegion(node.id, level0(contours[outer[0]]), holes,
                                    float(stats[piece, cv2.CC_STAT_AREA] * cell_mm2)))
    return regions
