"""The lymph-node modality of the landing zone: `ln_wsi/` (and `ln_annotations/`) in a drop, scanned
and requested like the other modalities, against a real Dagster instance."""

from __future__ import annotations

from gcmlm_assets import runs
from gcmlm_assets.catalogue import LN_FEATURES, LN_PATCH_COORDS, LYMPH_NODE, LYMPH_NODES, PATHOLOGY
from gcmlm_assets.definitions import MODALITY_ASSETS
from gcmlm_assets.landing.scan import LN_ANNOTATIONS_FOLDER, LN_WSI_FOLDER, plan_tick, scan_landing_zone
from gcmlm_assets_tests.support.landing.drops import Ticker, make_drop, requested, touch_later, touch_ready


def test_a_drop_with_lymph_node_slides_only_requests_the_lymph_node_chain(instance, landing_root):
    make_drop(landing_root, "P001", ct=False, ln_wsi=True)
    [drop] = scan_landing_zone(landing_root).drops
    assert set(drop.modalities) == {LYMPH_NODE}
    ticker = Ticker(instance, landing_root)
    [request] = ticker.tick().run_requests
    assert request.partition_key == "P001" and request.run_key.startswith(f"P001:{LYMPH_NODE}:")
    assert [key.to_user_string() for key in request.asset_selection] == [LN_PATCH_COORDS.key, LN_FEATURES.key,
                                                                                LYMPH_NODES.key]
    assert list(request.asset_selection) == MODALITY_ASSETS[LYMPH_NODE]
    assert request.tags["gcmlm/modality"] == LYMPH_NODE and request.tags[runs.WORK_TAG] == runs.LYMPH_NODE
    assert ticker.partitions() == {"P001"}
    assert ticker.tick().run_requests == []


def test_primary_and_lymph_node_slides_are_two_modalities_and_two_runs(instance, landing_root):
    make_drop(landing_root, "P001", ct=False, wsi=True, ln_wsi=True)
    ticker = Ticker(instance, landing_root)
    result = ticker.tick()
    assert requested(result) == [("P001", LYMPH_NODE), ("P001", PATHOLOGY)]
    by_modality = {r.tags["gcmlm/modality"]: r for r in result.run_requests}
    assert list(by_modality[PATHOLOGY].asset_selection) == MODALITY_ASSETS[PATHOLOGY]
    assert list(by_modality[LYMPH_NODE].asset_selection) == MODALITY_ASSETS[LYMPH_NODE]
    # neither chain selects the other's assets
    assert not set(MODALITY_ASSETS[PATHOLOGY]) & set(MODALITY_ASSETS[LYMPH_NODE])


def test_an_annotation_change_alone_requests_the_lymph_node_modality_again(instance, landing_root):
    folder = make_drop(landing_root, "P001", ct=False, wsi=True, ln_wsi=True)
    ticker = Ticker(instance, landing_root)
    first = {r.tags["gcmlm/modality"]: r.run_key for r in ticker.tick().run_requests}

    # Annotations moved in (the patient folder changes; READY is not touched): only the lymph-node
    # modality's files changed, so only it is requested.
    staged = landing_root.parent / "staged"
    staged.mkdir()
    (staged / "node1.geojson").write_text('{"type": "FeatureCollection", "features": []}')
    staged.rename(folder / LN_ANNOTATIONS_FOLDER)
    [again] = ticker.tick().run_requests
    assert (again.partition_key, again.tags["gcmlm/modality"]) == ("P001", LYMPH_NODE)
    assert again.run_key != first[LYMPH_NODE]

    # An annotation edited and committed (READY touched, which every modality's fingerprint holds):
    # the lymph-node modality is requested again with a new key.
    touch_later(folder / LN_ANNOTATIONS_FOLDER / "node1.geojson", b'{"type": "FeatureCollection"}')
    touch_ready(folder)
    edited = {r.tags["gcmlm/modality"]: r.run_key for r in ticker.tick().run_requests}
    assert edited.get(LYMPH_NODE) not in (None, first[LYMPH_NODE], again.run_key)
    assert ticker.tick().run_requests == []


def test_annotations_without_lymph_node_slides_request_nothing(instance, landing_root):
    folder = make_drop(landing_root, "P001", ct=False)
    (folder / LN_ANNOTATIONS_FOLDER).mkdir()
    (folder / LN_ANNOTATIONS_FOLDER / "node1.geojson").write_text("{}")
    (folder / LN_WSI_FOLDER).mkdir()  # an empty folder is no slide
    touch_ready(folder)
    assert plan_tick(scan_landing_zone(landing_root), None, 10).runs == []


def test_lymph_node_links_leaving_the_zone_are_refused(instance, landing_root, tmp_path):
    outside = tmp_path / "elsewhere"
    (outside / "slides").mkdir(parents=True)
    (outside / "slides" / "node1.svs").write_bytes(b"not ours")
    (outside / "node1.geojson").write_text("{}")
    folder_link = make_drop(landing_root, "FOLDER", ct=False, wsi=True)
    (folder_link / LN_WSI_FOLDER).symlink_to(outside / "slides", target_is_directory=True)
    annotation_link = make_drop(landing_root, "ANNOT", ct=False, ln_wsi=True)
    (annotation_link / LN_ANNOTATIONS_FOLDER).mkdir()
    (annotation_link / LN_ANNOTATIONS_FOLDER / "node1.geojson").symlink_to(outside / "node1.geojson")

    ticker = Ticker(instance, landing_root)
    # the primary slides of the same drop go on; neither lymph-node drop is requested
    assert requested(ticker.tick()) == [("FOLDER", PATHOLOGY)]
    refused = [m for m in ticker.messages if f"{LYMPH_NODE} not requested" in m]
    assert len(refused) == 2
    assert any(f"{folder_link / LN_WSI_FOLDER} is a symbolic link to {outside / 'slides'}" in m for m in refused)
    assert any(f"{annotation_link / LN_ANNOTATIONS_FOLDER / 'node1.geojson'} is a symbolic link to "
               f"{outside / 'node1.geojson'}" in m for m in refused)


def test_lymph_node_runs_wait_with_pathology_while_the_encoder_has_no_weights(instance, landing_root, tmp_path,
                                                                              monkeypatch):
    from gcmlm_assets.pathology.resources import PatchEncoder

    monkeypatch.delenv("GCMLM_UNI_CHECKPOINT", raising=False)
    make_drop(landing_root, "P001", wsi=True, ln_wsi=True)
    ticker = Ticker(instance, landing_root, encoder=PatchEncoder(name="uni"))
    assert requested(ticker.tick()) == [("P001", "radiology")]
    assert any(f"{LYMPH_NODE} held for 1 (P001)" in m and "GCMLM_UNI_CHECKPOINT" in m for m in ticker.messages)
    weights = tmp_path / "pytorch_model.bin"
    weights.write_bytes(b"weights of the operator's UNI checkpoint")
    monkeypatch.setenv("GCMLM_UNI_CHECKPOINT", str(weights))
    assert requested(ticker.tick()) == [("P001", LYMPH_NODE), ("P001", PATHOLOGY)]
