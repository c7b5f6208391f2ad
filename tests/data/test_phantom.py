"""Synthetic cine CMR phantom: determinism, layout, shared 3-D geometry across views, physiology, sites, complex."""

import numpy as np
import pytest

from cinema_jax.data import phantom as P

CFG = P.PhantomConfig()  # default sizes: the contract the rest of the package relies on
SMALL = P.PhantomConfig(sax_size=(96, 96), sax_spacing=(2.0, 2.0, 10.0), lax_size=(128, 128), lax_spacing=(2.0, 2.0),
                        n_frames=10)


def _subject_of(phenotype, seed=0, cfg=CFG, site=None):
    idx = next(i for i in range(10) if P.sample_subject(seed, i, cfg).phenotype_name == phenotype)
    return P.sample_subject(seed, idx, cfg, site=site)


@pytest.fixture(scope="module")
def nor_render():
    subj = _subject_of("NOR")
    meta = P.subject_metadata(subj, CFG)
    return subj, meta, P.render(subj, [meta["ed_frame"], meta["es_frame"]], cfg=CFG)


def test_constants():
    assert P.VIEWS == ("sax", "lax_2c", "lax_3c", "lax_4c")
    assert P.LABELS == ("BG", "RV", "MYO", "LV")
    assert P.PHENOTYPES == ("NOR", "DCM", "HCM", "MINF", "ARV")
    assert len(P.SITES) >= 3


def test_deterministic_and_index_dependent():
    a = P.render(P.sample_subject(3, 7, SMALL), [2], cfg=SMALL)
    b = P.render(P.sample_subject(3, 7, SMALL), [2], cfg=SMALL)
    c = P.render(P.sample_subject(3, 8, SMALL), [2], cfg=SMALL)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    assert not np.array_equal(a["sax"], c["sax"])
    assert not np.array_equal(a["lax_4c_label"], c["lax_4c_label"])


def test_shapes_dtypes_ranges(nor_render):
    subj, _, out = nor_render
    assert out["sax"].shape == (2, 192, 192, 16) and out["sax"].dtype == np.float32
    assert out["sax_label"].shape == (2, 192, 192, 16) and out["sax_label"].dtype == np.uint8
    np.testing.assert_allclose(out["sax_spacing"], [1, 1, 10])
    for view in P.LAX_VIEWS:
        assert out[view].shape == (2, 256, 256) and out[view].dtype == np.float32
        assert out[f"{view}_label"].shape == (2, 256, 256)
        assert out[f"{view}_landmarks"].shape == (2, 3, 2) and out[f"{view}_landmarks"].dtype == np.float32
        np.testing.assert_allclose(out[f"{view}_landmarks_mm"], out[f"{view}_landmarks"] * 1.0, atol=1e-4)
        np.testing.assert_allclose(out[f"{view}_spacing"], [1, 1])
    for view in P.VIEWS:
        img = out[view]
        assert img.min() >= 0 and img.max() <= 1 and img.max() == pytest.approx(1.0)
        assert set(np.unique(out[f"{view}_label"])) <= {0, 1, 2, 3}
    # SAX slices past the heart coverage are zero padding at the end, like CineMA
    assert 8 <= subj.n_sax <= 16
    assert np.all(out["sax"][:, :, :, subj.n_sax:] == 0) and np.all(out["sax_label"][:, :, :, subj.n_sax:] == 0)
    # blood is bright, myocardium dark: mean intensity inside LV > inside MYO in every view
    for view in P.VIEWS:
        img, lab = out[view][0], out[f"{view}_label"][0]
        assert img[lab == 3].mean() > img[lab == 2].mean() + 0.2, view


def test_labels_sample_the_shared_3d_geometry(nor_render):
    """Every rendered label equals the 3-D implicit function at that voxel's mm position (all views)."""
    subj, meta, out = nor_render
    for t, frame in enumerate([meta["ed_frame"], meta["es_frame"]]):
        for view in P.VIEWS:
            pts = P.view_points_mm(subj, view, CFG)
            truth = P.labels_at(subj, frame, pts, CFG)
            rendered = out[f"{view}_label"][t]
            if view == "sax":
                rendered = rendered[..., : subj.n_sax]
            mismatch = np.mean(truth != rendered)
            assert mismatch < 1e-4, (view, frame, mismatch)  # only float32 rounding exactly on a boundary


@pytest.mark.parametrize("phenotype", P.PHENOTYPES)
def test_labels_exact_for_every_phenotype(phenotype):
    """The per-part index boxes of the renderer never cut a structure: labels equal `labels_at` (all phenotypes,
    ED, ES and a diastolic frame, all views; 5 mm thick slices so the sub-plane path is exercised)."""
    subj = _subject_of(phenotype, cfg=SMALL, site=dict(P.SITES["A"], thickness_mm=5.0, name="thick"))
    frames = [0, P.es_frame_of(subj, SMALL), SMALL.n_frames - 2]
    out = P.render(subj, frames, cfg=SMALL)
    for t, frame in enumerate(frames):
        for view in P.VIEWS:
            truth = P.labels_at(subj, frame, P.view_points_mm(subj, view, SMALL), SMALL)
            rendered = out[f"{view}_label"][t]
            if view == "sax":
                rendered = rendered[..., : subj.n_sax]
            assert np.mean(truth != rendered) < 1e-4, (phenotype, view, frame)


def test_cross_view_agreement_on_plane_intersections(nor_render):
    """Where the 4C (and 2C) plane crosses a SAX slice, both images carry the same labels."""
    subj, _, out = nor_render
    sax_geo = P.view_geometry(subj, "sax", CFG)
    inv = np.linalg.inv(sax_geo["affine"])
    for view in ("lax_4c", "lax_2c"):
        pts = P.view_points_mm(subj, view, CFG).reshape(-1, 3)
        idx = pts @ inv[:3, :3].T + inv[:3, 3]
        near = np.abs(idx[:, 2] - np.round(idx[:, 2])) < 0.05  # within 0.5 mm of a SAX slice centre plane
        ijk = np.round(idx[near]).astype(int)
        inside = np.all((ijk >= 0) & (ijk < np.array(sax_geo["shape"])), axis=1)
        ijk = ijk[inside]
        lax_lab = out[f"{view}_label"][0].reshape(-1)[near][inside]
        sax_lab = out["sax_label"][0][ijk[:, 0], ijk[:, 1], ijk[:, 2]]
        heart = (lax_lab > 0) | (sax_lab > 0)
        assert heart.sum() > 50, view
        agree = np.mean(lax_lab[heart] == sax_lab[heart])
        assert agree > 0.85, (view, agree)
        assert np.any(lax_lab == 3) and np.any(sax_lab == 3)


def test_view_content(nor_render):
    _, _, out = nor_render
    counts = {v: np.bincount(out[f"{v}_label"][0].ravel(), minlength=4) for v in P.VIEWS}
    for view in P.VIEWS:
        assert counts[view][3] > 0 and counts[view][2] > 0, view  # LV and MYO everywhere at ED
    assert counts["lax_4c"][1] > 500  # 4C cuts the RV
    assert counts["lax_2c"][1] < 0.1 * counts["lax_4c"][1]  # 2C: LV only (at most a sliver of RV)
    assert counts["sax"][1] > 0


def test_landmarks_inside_and_anatomical(nor_render):
    _, _, out = nor_render
    for view in P.LAX_VIEWS:
        lm = out[f"{view}_landmarks"]
        assert np.all(lm >= 0) and np.all(lm <= 255), view
        for t in range(2):
            h1, h2, apex = lm[t]
            mid = (h1 + h2) / 2
            annulus = np.linalg.norm(h1 - h2)
            assert 20 < annulus < 70, (view, annulus)
            assert np.linalg.norm(apex - mid) > 1.3 * annulus / 2 + 20, view  # apex far from the base
            lab = out[f"{view}_label"][t]
            for x, y in (h1, h2):  # hinges sit on the LV boundary
                patch = lab[int(round(x)) - 3:int(round(x)) + 4, int(round(y)) - 3:int(round(y)) + 4]
                assert np.any(patch == 3) and np.any(patch != 3), view
        # long-axis shortening: the valve plane moves toward the apex in systole (MAPSE > 0), apex nearly fixed
        mid_ed, mid_es = lm[0, :2].mean(0), lm[1, :2].mean(0)
        ax_ed = np.linalg.norm(lm[0, 2] - mid_ed)
        ax_es = np.linalg.norm(lm[1, 2] - mid_es)
        assert ax_ed - ax_es > 5.0, view
        assert np.linalg.norm(lm[0, 2] - lm[1, 2]) < 8.0  # apex moves little (the LV contracts toward the septum)


def test_volumes_ed_es_and_phenotypes():
    rows = {p: [P.subject_metadata(_subject_of(p, seed=s), CFG) for s in range(3)] for p in P.PHENOTYPES}
    for p, metas in rows.items():
        for m in metas:
            assert m["phenotype_name"] == p and P.PHENOTYPES[m["phenotype"]] == p
            assert m["lv_edv"] > m["lv_esv"] > 0 and m["rv_edv"] > m["rv_esv"] > 0, p
            assert m["ed_frame"] == 0 and 0.25 * CFG.n_frames <= m["es_frame"] <= 0.45 * CFG.n_frames
            assert {"noise", "bias", "resolution_mm", "thickness_mm", "contrast", "name"} <= set(m["site"])
    get = lambda p, k: np.array([m[k] for m in rows[p]])  # noqa: E731
    assert np.all((get("NOR", "lv_ef") > 50) & (get("NOR", "lv_ef") < 75))
    assert np.all((get("NOR", "lv_edv") > 90) & (get("NOR", "lv_edv") < 190))
    assert np.all((get("NOR", "rv_ef") > 45) & (get("NOR", "rv_ef") < 75))
    assert get("DCM", "lv_ef").max() < min(40, get("NOR", "lv_ef").min())
    assert get("DCM", "lv_edv").min() > get("NOR", "lv_edv").max()
    assert get("HCM", "lv_myo_ed").min() > get("NOR", "lv_myo_ed").max()
    assert get("HCM", "lv_ef").min() > get("NOR", "lv_ef").mean()
    assert get("MINF", "lv_ef").max() < get("NOR", "lv_ef").min()
    assert get("ARV", "rv_edv").min() > get("NOR", "rv_edv").max()
    assert get("ARV", "rv_ef").max() < get("NOR", "rv_ef").min()


def test_ed_es_are_volume_extremes():
    subj = _subject_of("NOR", cfg=SMALL)
    vols = P.sax_label_volumes(subj, None, SMALL)
    meta = P.subject_metadata(subj, SMALL)
    assert vols["lv"].argmax() == meta["ed_frame"] and vols["lv"].argmin() == meta["es_frame"]
    assert meta["lv_edv"] == pytest.approx(vols["lv"][0]) and meta["lv_esv"] == pytest.approx(vols["lv"].min())
    # volume = voxel count x voxel volume (2 x 2 x 10 mm = 0.04 mL), not a sum of label values
    lab = P.render(subj, [0], views=("sax",), cfg=SMALL)["sax_label"][0]
    assert meta["lv_edv"] == pytest.approx(np.count_nonzero(lab == 3) * 0.04)
    assert meta["rv_edv"] == pytest.approx(np.count_nonzero(lab == 1) * 0.04)


def test_minf_segment_is_akinetic():
    subj = _subject_of("MINF")
    inf = subj.lv["infarct"]
    es = P.es_frame_of(subj, CFG)
    depth = 0.55 * subj.lv["length"]

    def border(direction, frame):
        r = np.arange(0, 70, 0.25)
        h = np.stack([r * direction[0], r * direction[1], np.full_like(r, depth)], -1)
        lab = P.labels_at(subj, frame, subj.centre + h @ subj.axes, CFG)
        return r[np.argmax(lab != 3)]

    d_inf = np.array(inf["dir"])
    moved_inf = border(d_inf, 0) - border(d_inf, es)
    moved_remote = border(-d_inf, 0) - border(-d_inf, es)
    assert abs(moved_inf) < 2.0 and moved_remote > 4.0, (moved_inf, moved_remote)


def test_sites_change_intensity_statistics():
    stats = []
    for name in P.SITES:
        subj = _subject_of("NOR", cfg=SMALL, site=name)
        out = P.render(subj, [0], views=("lax_4c",), cfg=SMALL)
        img, lab = out["lax_4c"][0], out["lax_4c_label"][0]
        contrast = img[lab == 3].mean() - img[lab == 2].mean()
        stats.append((img.mean(), img.std(), contrast, np.abs(np.diff(img, axis=0)).mean()))
        assert subj.site["name"] == name
    stats = np.array(stats)
    assert np.ptp(stats[:, 0]) > 0.03 and np.ptp(stats[:, 2]) > 0.05 and np.ptp(stats[:, 3]) > 0.01
    # the same anatomy under two sites: identical labels, different images
    a = P.render(_subject_of("NOR", cfg=SMALL, site="A"), [0], views=("sax",), cfg=SMALL)
    d = P.render(_subject_of("NOR", cfg=SMALL, site="D"), [0], views=("sax",), cfg=SMALL)
    np.testing.assert_array_equal(a["sax_label"], d["sax_label"])
    assert np.abs(a["sax"] - d["sax"]).mean() > 0.02
    # random sites draw parameters from the configured ranges
    rnd = P.sample_subject(0, 1, P.PhantomConfig(sites=("random",))).site
    assert rnd["name"] == "random" and 0.01 <= rnd["noise"] <= 0.08
    with pytest.raises(ValueError):
        P.PhantomConfig(sites=("nope",))


def test_complex_image_magnitude_and_smooth_phase():
    site = dict(P.SITES["A"], noise=0.0, name="clean")
    subj = _subject_of("NOR", cfg=SMALL, site=site)
    out = P.render(subj, [0], views=("sax", "lax_4c"), cfg=SMALL, complex_image=True)
    for view in ("sax", "lax_4c"):
        cplx, img = out[f"{view}_complex"][0], out[view][0]
        assert cplx.dtype == np.complex64 and cplx.shape == img.shape
        mag = np.abs(cplx)
        assert mag.max() == pytest.approx(1.0, abs=1e-5)
        scale = img.max() / mag.max()
        np.testing.assert_allclose(mag * scale, img, atol=1e-4)  # noise-free: magnitude image up to scale
        ph = np.angle(cplx)
        ok = (mag[1:] > 0.05) & (mag[:-1] > 0.05)
        step = np.abs(np.angle(np.exp(1j * (ph[1:] - ph[:-1]))))[ok]
        assert step.max() < 0.2 and np.ptp(ph[mag > 0.05]) > 0.3  # smooth but not constant
    # with noise the magnitude image is the noisy version of the same picture
    noisy = P.render(_subject_of("NOR", cfg=SMALL, site="C"), [0], views=("lax_4c",), cfg=SMALL,
                     complex_image=True)
    corr = np.corrcoef(np.abs(noisy["lax_4c_complex"][0]).ravel(), noisy["lax_4c"][0].ravel())[0, 1]
    assert 0.9 < corr < 0.9999


def test_complex_plane_is_the_volume_slice_up_to_scale():
    """`render_complex_plane` renders one plane alone: the same picture as that slice of `render`'s volume (LAX:
    identical), normalised per frame over the plane; past the data slices it is zero, as the volume's padding."""
    subj = _subject_of("DCM", cfg=SMALL)
    frames = [0, SMALL.n_frames // 2]
    vol = P.render(subj, frames, views=("sax", "lax_2c"), cfg=SMALL, complex_image=True)
    for k in (0, subj.n_sax // 2, subj.n_sax - 1):
        plane = P.render_complex_plane(subj, "sax", k, frames, cfg=SMALL)
        ref = vol["sax_complex"][..., k]
        assert plane.shape == ref.shape and plane.dtype == np.complex64
        peak = np.abs(plane).reshape(len(frames), -1).max(1)
        np.testing.assert_allclose(peak, 1.0, atol=1e-5)
        scale = np.abs(ref).reshape(len(frames), -1).max(1) / peak
        assert np.all(scale > 0.05)  # this slice holds signal
        np.testing.assert_allclose(plane * scale[:, None, None], ref, atol=2e-5)
    np.testing.assert_array_equal(P.render_complex_plane(subj, "lax_2c", 0, frames, cfg=SMALL), vol["lax_2c_complex"])
    if subj.n_sax < SMALL.n_slices:
        assert not np.any(P.render_complex_plane(subj, "sax", subj.n_sax, frames, cfg=SMALL))
    with pytest.raises(ValueError, match="outside"):
        P.render_complex_plane(subj, "sax", SMALL.n_slices, frames, cfg=SMALL)
    with pytest.raises(ValueError, match="unknown view"):
        P.render_complex_plane(subj, "lax_5c", 0, frames, cfg=SMALL)


def test_render_speed_budget():
    """One frame of all four views with labels at default sizes stays within the training budget."""
    import time

    subj = P.sample_subject(0, 0, CFG)
    P.render(subj, [0], cfg=CFG)
    t = time.perf_counter()
    for f in range(3):
        P.render(subj, [f], cfg=CFG)
    assert (time.perf_counter() - t) / 3 < 0.5  # generous for a loaded 2-core CI box; ~0.03 s measured
