"""Lymph-node annotations: QuPath GeoJSON exports in every accepted form, every refusal naming the file, the
patch labels by centre (holes honoured) and the matching of annotation files to slides."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from gcmlm_assets.pathology.lymph_nodes.annotations import (
    NOT_TUMOUR, TUMOUR, UNLABELLED, AnnotationError, annotation_files, patch_labels, read_annotations, region_area,
)
from gcmlm_assets_tests.support.pathology.ln_fixtures import annotation, polygon, square, write_annotations

NODE = polygon(square(0, 0, 1000, 1000))
TUMOUR_WITH_HOLE = polygon(square(200, 200, 800, 800), square(400, 400, 600, 600, clockwise=True))


@pytest.mark.parametrize("form", ["dict", "string", "name"])
@pytest.mark.parametrize("collection", [True, False], ids=["FeatureCollection", "list"])
def test_each_accepted_form_reads_the_same_polygons(tmp_path, form, collection):
    path = write_annotations(tmp_path / "s.geojson", [annotation(NODE, "Lymph node", form=form),
                                                      annotation(TUMOUR_WITH_HOLE, "Tumor", form=form)],
                             collection=collection)
    read = read_annotations(path, dimensions=(1000, 1000))
    assert len(read.nodes) == 1 and len(read.tumours) == 1 and read.ignored == {}
    np.testing.assert_array_equal(read.nodes[0].outer, np.asarray(square(0, 0, 1000, 1000), float))
    assert read.nodes[0].holes == ()
    assert len(read.tumours[0].holes) == 1
    assert region_area(read.tumours[0]) == 600 * 600 - 200 * 200


def test_a_single_feature_multipolygons_aliases_and_ignored_classes(tmp_path):
    single = write_annotations(tmp_path / "one.geojson", [], collection=False)
    single.write_text(json.dumps(annotation(NODE, "node")))
    assert len(read_annotations(single).nodes) == 1

    multi = {"type": "MultiPolygon", "coordinates": [[square(0, 0, 10, 10)], [square(20, 0, 30, 10)]]}
    features = [annotation(multi, "LYMPH_NODE"), annotation(NODE, "LymphNode"), annotation(NODE, "Lymph Node"),
                annotation(TUMOUR_WITH_HOLE, "TUMOUR"), annotation(TUMOUR_WITH_HOLE, "tumor", form="string"),
                annotation(NODE, "Stroma"), annotation(NODE, "Stroma"), annotation(NODE, None),
                {**annotation(polygon(square(1, 1, 2, 2)), "Tumor"), "properties": {
                    "objectType": "detection", "classification": {"name": "Tumor"}}},
                # an ignored class is not validated: QuPath points and lines of other classes do no harm
                annotation({"type": "Point", "coordinates": [5, 5]}, "Other")]
    read = read_annotations(write_annotations(tmp_path / "many.geojson", features))
    assert (len(read.nodes), len(read.tumours)) == (4, 2)  # the MultiPolygon is two node regions
    assert read.ignored == {"(unclassified)": 1, "Other": 1, "Stroma": 2, "detection objects": 1}


def _bad(tmp_path, name, content):
    path = tmp_path / f"{name}.geojson"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return path


@pytest.mark.parametrize("name, content, problem", [
    ("not_json", "{this is not json", "not a readable JSON file"),
    ("not_features", {"type": "Polygon", "coordinates": [square(0, 0, 1, 1)]}, "not GeoJSON features"),
    ("not_a_feature", [{"type": "Polygon"}], "feature 0 is not a GeoJSON Feature"),
    ("point", [annotation({"type": "Point", "coordinates": [1, 2]}, "Tumor")],
     "geometry type 'Point' is not supported"),
    ("no_geometry", [annotation(None, "Tumor")], "feature 0: no geometry"),
    ("unclosed", [annotation(polygon(square(0, 0, 10, 10)[:-1]), "Node")], "not a closed ring"),
    ("degenerate", [annotation(polygon([[0, 0], [5, 5], [10, 10], [0, 0]]), "Node")], "degenerate ring"),
    ("not_numbers", [annotation(polygon([["a", 0], [5, 5], [10, 10], ["a", 0]]), "Node")],
     "positions are not \\[x, y\\] numbers"),
    ("outside", [annotation(polygon(square(0, 0, 5000, 10)), "Node")],
     "outside the slide's level-0 2000 x 1000 px"),
    ("no_class", [annotation(NODE, "Stroma"), annotation(NODE, None)],
     "no lymph-node or tumour annotation .* found \\(unclassified\\) \\(1\\), Stroma \\(1\\)"),
    ("empty", {"type": "FeatureCollection", "features": []}, "no lymph-node or tumour annotation"),
])
def test_each_refusal_names_the_file_and_the_problem(tmp_path, name, content, problem):
    path = _bad(tmp_path, name, content)
    with pytest.raises(AnnotationError, match=re.escape(str(path)) + ".*" + problem):
        read_annotations(path, dimensions=(2000, 1000))


def test_a_vertex_on_the_slide_edge_is_inside_the_slide(tmp_path):
    path = write_annotations(tmp_path / "edge.geojson", [annotation(polygon(square(0, 0, 2000.5, 1000)), "Node")])
    assert len(read_annotations(path, dimensions=(2000, 1000)).nodes) == 1


def test_patch_labels_by_centre_with_the_tumour_hole_honoured(tmp_path):
    path = write_annotations(tmp_path / "s.geojson", [annotation(NODE, "Lymph node"),
                                                      annotation(TUMOUR_WITH_HOLE, "Tumor")])
    read = read_annotations(path)
    side = 100
    ys, xs = np.mgrid[0:12, 0:12]
    coords = np.stack([xs.ravel(), ys.ravel()], axis=1) * side  # a 1200 x 1200 px grid over the 1000 px node
    labels = patch_labels(coords, side, read)
    assert labels.dtype == np.int8
    centre = coords + side / 2
    in_node = (centre < 1000).all(axis=1)
    in_tumour = ((centre > 200) & (centre < 800)).all(axis=1) & ~((centre > 400) & (centre < 600)).all(axis=1)
    expected = np.where(in_tumour, TUMOUR, np.where(in_node, NOT_TUMOUR, UNLABELLED))
    np.testing.assert_array_equal(labels, expected)
    by_corner = dict(zip(map(tuple, coords.tolist()), labels.tolist()))
    assert by_corner[(200, 200)] == TUMOUR and by_corner[(400, 400)] == NOT_TUMOUR  # (400, 400): in the hole
    assert by_corner[(0, 0)] == NOT_TUMOUR and by_corner[(1000, 0)] == UNLABELLED
    assert (labels == TUMOUR).sum() == 36 - 4 and (labels == UNLABELLED).sum() == 144 - 100


def test_annotation_files_match_slides_by_name_and_report_the_rest(tmp_path):
    folder = tmp_path / "ln_annotations"
    folder.mkdir()
    for name in ("LN-1.geojson", "LN 2.GeoJSON", "orphan.geojson", "notes.txt", ".DS_Store"):
        (folder / name).write_text("{}")
    found = annotation_files(folder, ["LN-1", "LN 2", "LN-3"])
    assert found.by_slide == {"LN 2": folder / "LN 2.GeoJSON", "LN-1": folder / "LN-1.geojson"}
    assert found.unmatched == (folder / "notes.txt", folder / "orphan.geojson")
    assert annotation_files(tmp_path / "absent", ["LN-1"]).by_slide == {}
