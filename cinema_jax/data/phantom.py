"""Built-in synthetic cine CMR: a seeded 3D+t beating heart cut into the four CineMA views.

Why: every task (MAE pretraining, segmentation, classification, EF regression, landmarks, denoising) needs data that
runs anywhere without downloads, and whose ground truth is exact. All views are sampled from ONE implicit 3-D
geometry defined in millimetres, so a voxel's label in the SAX stack and a pixel's label in a LAX plane agree
wherever the planes meet.

Frames (all in mm):
- patient frame (x to the patient's left, y posterior, z head-ward; origin at the body axis at heart level), in which
  the body, lungs, liver, spine, descending aorta, bias field and phase live;
- heart frame (a, b, c): c along the LV long axis from the ED mitral-valve centre (c = 0) toward the apex, a from the
  RV toward the LV lateral wall (septal -> lateral), b = c x a (roughly anterior). `Subject.axes` holds the unit
  vectors u_a, u_b, u_c (rows) in patient coordinates, `Subject.centre` the heart-frame origin.

Heart model: LV cavity and epicardium are truncated half-ellipsoids below the mitral plane whose base descends toward a
fixed apex in systole (long-axis shortening, MAPSE); the cavity volume follows a smooth volume curve (ED at frame 0,
ES at 30-40 % of the cycle) and the myocardium keeps its volume, so the wall thickens. The RV is an ellipsoidal
crescent wrapped around the septum; atria, aortic root, descending aorta, lungs, liver, spine and chest wall give the
surrounding anatomy. Phenotypes (ACDC classes) change sizes, wall thickness and motion.

Arrays: images (X, Y[, Z]) with x the first axis (transpose to display with y down the rows), labels uint8 in ACDC
order 0 BG, 1 RV, 2 MYO, 3 LV. numpy + scipy only (this package never imports jax in `cinema_jax/data`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

VIEWS = ("sax", "lax_2c", "lax_3c", "lax_4c")
LAX_VIEWS = VIEWS[1:]
LABELS = ("BG", "RV", "MYO", "LV")
PHENOTYPES = ("NOR", "DCM", "HCM", "MINF", "ARV")
# Tissue classes of the intensity model (index = class id); site contrast gives one intensity per class.
TISSUES = ("air", "fat", "muscle", "soft", "lung", "liver", "bone", "myo", "blood", "vessel_blood")
LANDMARKS = ("mv_hinge_1", "mv_hinge_2", "apex")

_AIR, _FAT, _MUSCLE, _SOFT, _LUNG, _LIVER, _BONE, _MYO, _BLOOD, _VBLOOD = range(len(TISSUES))

# Acquisition "sites" (scanner / vendor / protocol). contrast: intensity per tissue before bias and noise (bSSFP-like:
# blood bright, myocardium dark grey, fat bright, lung dark); noise: Rician sigma relative to blood; bias: strength of
# the smooth multiplicative coil field (log-amplitude); resolution_mm: acquired in-plane pixel size (images are
# blurred to it, then kept on the 1 mm grid); thickness_mm: slice thickness (through-plane averaging).
SITES: dict[str, dict] = {
    "A": {
        "contrast": dict(air=0.0, fat=0.80, muscle=0.28, soft=0.42, lung=0.05, liver=0.36, bone=0.22, myo=0.28,
                         blood=1.0, vessel_blood=0.95),
        "noise": 0.03, "bias": 0.15, "resolution_mm": 1.2, "thickness_mm": 8.0,
    },
    "B": {
        "contrast": dict(air=0.0, fat=0.62, muscle=0.40, soft=0.50, lung=0.10, liver=0.48, bone=0.30, myo=0.42,
                         blood=0.85, vessel_blood=0.75),
        "noise": 0.05, "bias": 0.35, "resolution_mm": 1.8, "thickness_mm": 10.0,
    },
    "C": {
        "contrast": dict(air=0.0, fat=1.00, muscle=0.20, soft=0.35, lung=0.03, liver=0.55, bone=0.15, myo=0.18,
                         blood=0.90, vessel_blood=1.0),
        "noise": 0.08, "bias": 0.25, "resolution_mm": 1.0, "thickness_mm": 6.0,
    },
    "D": {
        "contrast": dict(air=0.0, fat=0.70, muscle=0.33, soft=0.30, lung=0.08, liver=0.30, bone=0.25, myo=0.33,
                         blood=0.75, vessel_blood=0.80),
        "noise": 0.02, "bias": 0.50, "resolution_mm": 2.2, "thickness_mm": 10.0,
    },
}


@dataclass(frozen=True)
class PhantomConfig:
    """Sizes (pixels), spacings (mm), frames and the populations subjects are drawn from.

    `sites` lists preset names from `SITES` to draw from uniformly; the name 'random' draws a fresh site from the
    `*_range` fields (contrast = a random preset's contrast jittered by +-`contrast_jitter` relative).
    `max_subplanes` caps the through-plane samples used to mimic slice thickness (1 or 3; 3 = centre +- thickness/3).
    """

    sax_size: tuple[int, int] = (192, 192)
    n_slices: int = 16
    sax_spacing: tuple[float, float, float] = (1.0, 1.0, 10.0)
    lax_size: tuple[int, int] = (256, 256)
    lax_spacing: tuple[float, float] = (1.0, 1.0)
    n_frames: int = 25
    phenotypes: tuple[str, ...] = PHENOTYPES
    sites: tuple[str, ...] = ("A", "B", "C", "D")
    noise_range: tuple[float, float] = (0.01, 0.08)
    bias_range: tuple[float, float] = (0.0, 0.5)
    resolution_range: tuple[float, float] = (1.0, 2.2)
    thickness_range: tuple[float, float] = (5.0, 10.0)
    contrast_jitter: float = 0.15
    max_subplanes: int = 3

    def __post_init__(self):
        bad = [p for p in self.phenotypes if p not in PHENOTYPES]
        if bad or not self.phenotypes:
            raise ValueError(f"phenotypes must be a non-empty subset of {PHENOTYPES}, got {self.phenotypes}")
        bad = [s for s in self.sites if s not in SITES and s != "random"]
        if bad or not self.sites:
            raise ValueError(f"sites must be names from {tuple(SITES)} or 'random', got {self.sites}")
        if self.n_frames < 1 or self.n_slices < 1:
            raise ValueError("n_frames and n_slices must be >= 1")


@dataclass(frozen=True, eq=False)
class Subject:
    """All parameters of one synthetic subject (mm, mL); drawing one is cheap, rendering does the work."""

    seed: int
    index: int
    phenotype: int
    site: dict
    centre: np.ndarray  # (3,) patient mm: heart-frame origin (LV axis at the ED mitral plane)
    axes: np.ndarray  # (3, 3) rows u_a, u_b, u_c (patient frame)
    lv: dict
    rv: dict
    vessels: dict
    views: dict  # view -> dict(centre (3,), e1, e2, e3) patient frame; SAX centre is that of slice 0
    n_sax: int  # SAX slices that hold data (the rest of cfg.n_slices are zero-padded at the end)
    bias_coef: np.ndarray
    phase_coef: np.ndarray
    extras: dict = field(default_factory=dict)

    @property
    def phenotype_name(self) -> str:
        return PHENOTYPES[self.phenotype]


# ----------------------------------------------------------------------------------------------------------- sampling
def _unit(v):
    v = np.asarray(v, dtype=np.float64)
    return v / np.linalg.norm(v)


def _rotate(v, axis, angle):
    """Rodrigues rotation of vector v about unit `axis` by `angle` (rad)."""
    axis = _unit(axis)
    return v * math.cos(angle) + np.cross(axis, v) * math.sin(angle) + axis * np.dot(axis, v) * (1 - math.cos(angle))


def _site_params(name_or_dict, rng: np.random.Generator, cfg: PhantomConfig) -> dict:
    if isinstance(name_or_dict, dict):
        site = {k: (dict(v) if isinstance(v, dict) else v) for k, v in name_or_dict.items()}
        site.setdefault("name", "custom")
        base = SITES["A"]
        for key in ("noise", "bias", "resolution_mm", "thickness_mm"):
            site.setdefault(key, base[key])
        contrast = dict(base["contrast"])
        contrast.update(site.get("contrast", {}))
        site["contrast"] = contrast
        return site
    if name_or_dict == "random":
        base = SITES[sorted(SITES)[int(rng.integers(len(SITES)))]]
        jit = cfg.contrast_jitter
        contrast = {k: (0.0 if k == "air" else float(v * rng.uniform(1 - jit, 1 + jit)))
                    for k, v in base["contrast"].items()}
        return {
            "name": "random",
            "contrast": contrast,
            "noise": float(rng.uniform(*cfg.noise_range)),
            "bias": float(rng.uniform(*cfg.bias_range)),
            "resolution_mm": float(rng.uniform(*cfg.resolution_range)),
            "thickness_mm": float(rng.uniform(*cfg.thickness_range)),
        }
    if name_or_dict not in SITES:
        raise ValueError(f"unknown site {name_or_dict!r}; presets: {tuple(SITES)} or 'random'")
    preset = SITES[name_or_dict]
    return {"name": name_or_dict, "contrast": dict(preset["contrast"]),
            **{k: preset[k] for k in ("noise", "bias", "resolution_mm", "thickness_mm")}}


# Per phenotype: uniform ranges for LV EDV (mL), LV EF (%), ED wall (mm), ED long-axis cavity length (mm), MAPSE (mm),
# RV size scale, RV in-plane shortening fraction, TAPSE (mm).
_PHENO_RANGES = {
    "NOR": dict(edv=(110, 160), ef=(58, 70), wall=(7, 9.5), length=(82, 95), mapse=(11, 16),
                rv_scale=(1.02, 1.15), rv_short=(0.22, 0.30), tapse=(16, 24)),
    "DCM": dict(edv=(230, 330), ef=(15, 33), wall=(5.5, 7.5), length=(95, 110), mapse=(4, 8),
                rv_scale=(1.0, 1.15), rv_short=(0.14, 0.22), tapse=(10, 16)),
    "HCM": dict(edv=(90, 130), ef=(72, 85), wall=(13, 19), length=(78, 90), mapse=(6, 10),
                rv_scale=(0.9, 1.05), rv_short=(0.22, 0.30), tapse=(15, 22)),
    "MINF": dict(edv=(160, 230), ef=(32, 45), wall=(7, 9.5), length=(88, 102), mapse=(6, 10),
                 rv_scale=(0.95, 1.1), rv_short=(0.18, 0.26), tapse=(13, 20)),
    "ARV": dict(edv=(100, 150), ef=(52, 65), wall=(7, 9.5), length=(82, 95), mapse=(9, 13),
                rv_scale=(1.35, 1.55), rv_short=(0.06, 0.12), tapse=(8, 12)),
}


def sample_subject(seed: int, index: int, cfg: PhantomConfig = PhantomConfig(), site=None) -> Subject:
    """Draw subject `index` of the population `seed` (deterministic in (seed, index); no rendering).

    The phenotype cycles through `cfg.phenotypes` with the index (balanced classes); `site` is None (drawn from
    `cfg.sites`), a preset name from `SITES`, 'random', or a dict overriding preset A's fields.
    """
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, int(index) & 0xFFFFFFFF, 0x5EED])
    pname = cfg.phenotypes[(int(index) + int(seed)) % len(cfg.phenotypes)]
    ph = PHENOTYPES.index(pname)
    rg = _PHENO_RANGES[pname]
    u = lambda key: float(rng.uniform(*rg[key]))  # noqa: E731

    if site is None:
        site = cfg.sites[int(rng.integers(len(cfg.sites)))]
    site_p = _site_params(site, rng, cfg)

    # ---- orientation of the heart in the patient frame (LPS-like: +x left, +y posterior, +z head)
    u_c = _unit(np.array([0.58, -0.48, -0.62]) + rng.normal(0, 0.06, 3))  # base -> apex: left, anterior, inferior
    a_guess = np.array([0.70, 0.70, 0.05]) + rng.normal(0, 0.05, 3)  # RV -> LV lateral: posterior-left
    u_a = _unit(a_guess - np.dot(a_guess, u_c) * u_c)
    u_b = np.cross(u_c, u_a)
    axes = np.stack([u_a, u_b, u_c])
    centre = np.array([18.0, -12.0, 28.0]) + rng.normal(0, 5.0, 3)

    # ---- LV
    edv, ef = u("edv"), u("ef")
    esv = edv * (1 - ef / 100)
    length = u("length")
    wall = u("wall")
    r0 = math.sqrt(3 * edv * 1000 / (2 * math.pi * length))
    apex = 0.8 * wall if pname != "HCM" else 0.6 * wall
    v_myo = 2 / 3 * math.pi * ((r0 + wall) ** 2 * (length + apex) - r0 ** 2 * length)
    lv = dict(edv=edv, esv=esv, length=length, wall=wall, apex=apex, r0=r0, v_myo=v_myo, mapse=u("mapse"),
              es_phase=float(rng.uniform(0.30, 0.40)), septal=0.0, infarct=None)
    if pname == "HCM":
        lv["septal"] = float(rng.uniform(3.0, 8.0))  # asymmetric septal hypertrophy (mm)
    if pname == "MINF":
        # coronary territory: LAD (anterior / anteroseptal), LCx (lateral), RCA (inferior); angle in the (a, b) plane
        centre_deg = [100.0, 0.0, -90.0][int(rng.integers(3))] + float(rng.uniform(-25, 25))
        half = math.radians(float(rng.uniform(35, 60)))
        ang = math.radians(centre_deg)
        lv["infarct"] = dict(dir=(math.cos(ang), math.sin(ang)), cos_half=math.cos(half),
                             scar=float(rng.uniform(3.0, 5.0)), angle_deg=centre_deg)

    # ---- RV (sizes relative to the ED epicardial radius)
    rp0 = r0 + wall
    sc = u("rv_scale")
    rv = dict(centre_a=-0.6 * rp0, ra=1.0 * rp0 * sc, rb=1.2 * rp0 * sc, clip_a=-0.15 * rp0, wall=3.0,
              base=6.0, length=0.8 * length + (sc - 1) * 15, shortening=u("rv_short"), tapse=u("tapse"))

    # ---- atria and great vessels (heart frame, mm)
    ang3 = math.radians(float(rng.uniform(110, 125)))  # 3C plane direction (toward the aortic root)
    d3 = (math.cos(ang3), math.sin(ang3))
    ao_r = float(np.clip(0.42 * r0, 10.0, 16.0))
    ao_dir = _unit([0.5 * d3[0], 0.5 * d3[1], -1.0])
    la = (0.95 * r0, 0.85 * r0, 0.95 * r0)
    la = tuple(float(np.clip(v, 18, 34)) for v in la)
    vessels = dict(
        la_centre=(0.15 * r0, -0.45 * r0, -0.75 * la[2]), la_radii=la,
        ra_centre=(rv["centre_a"] - 0.25 * rp0, -0.1 * r0, -0.7 * 26.0), ra_radii=(0.8 * rp0, 25.0, 26.0),
        ao_root=(0.62 * r0 * d3[0], 0.62 * r0 * d3[1]), ao_dir=tuple(float(v) for v in ao_dir), ao_r=ao_r, ao_len=55.0,
        mediastinum=tuple(float(v) for v in centre + axes.T @ np.array([-15.0, 0.0, 0.4 * length])),
        mediastinum_radii=(75.0, 80.0, 90.0),
        body=(float(rng.uniform(150, 175)), float(rng.uniform(105, 120))),
    )

    # ---- view planes (patient frame)
    views = {}
    psi = math.radians(float(rng.uniform(-15, 15)))
    e1 = _rotate(u_a, u_c, psi)
    e2 = np.cross(u_c, e1) * -1.0  # -b rotated: anterior at the top of the displayed image
    sax_first = -float(rng.uniform(8, 16))  # slice 0 a little above the ED mitral plane (atria), then toward apex
    apex_c = length + apex
    n_sax = int(min(cfg.n_slices, math.floor((apex_c + 8 - sax_first) / cfg.sax_spacing[2]) + 1))
    sax_c = centre + axes.T @ np.array([-12.0 + rng.normal(0, 4), rng.normal(0, 4), sax_first])
    views["sax"] = dict(centre=sax_c, e1=e1, e2=e2, e3=u_c.copy())
    lax_dirs = {
        "lax_4c": math.radians(float(rng.uniform(-10, 5))),
        "lax_2c": math.radians(90 + float(rng.uniform(-8, 8))),
        "lax_3c": ang3,
    }
    for name in LAX_VIEWS:
        ang = lax_dirs[name]
        d = math.cos(ang) * u_a + math.sin(ang) * u_b  # in-plane direction perpendicular to the long axis
        if name == "lax_2c":
            d = -d  # anterior wall on the right of the image
        tilt = math.radians(float(rng.uniform(-12, 12)))
        f1 = math.cos(tilt) * d + math.sin(tilt) * (-u_c)
        f2 = -math.sin(tilt) * d + math.cos(tilt) * (-u_c)  # rows go from apex (top) to atria (bottom)
        normal = np.cross(f1, f2)
        c_mm = centre + axes.T @ np.array([0.0, 0.0, 0.35 * length]) + (f1 * rng.normal(0, 5) + f2 * rng.normal(0, 5))
        views[name] = dict(centre=c_mm, e1=f1, e2=f2, e3=normal,
                           dir_ab=(float(np.dot(d, u_a)), float(np.dot(d, u_b))))

    bias_coef = rng.normal(0, 1, 5)
    phase_coef = rng.normal(0, 1, 5)
    return Subject(seed=int(seed), index=int(index), phenotype=ph, site=site_p, centre=centre, axes=axes, lv=lv,
                   rv=rv, vessels=vessels, views=views, n_sax=n_sax, bias_coef=bias_coef, phase_coef=phase_coef)


# ------------------------------------------------------------------------------------------------------------- motion
def _contraction(phase: float, es_phase: float) -> float:
    """Fraction of the stroke already ejected: 0 at ED (phase 0), 1 at ES; rapid filling, diastasis, atrial kick."""
    phase = phase % 1.0
    if phase <= es_phase:
        return 0.5 * (1 - math.cos(math.pi * phase / es_phase))
    t = (phase - es_phase) / (1 - es_phase)
    g = 0.8 * 0.5 * (1 - math.cos(math.pi * min(t / 0.45, 1.0)))
    g += 0.2 * 0.5 * (1 - math.cos(math.pi * max((t - 0.75) / 0.25, 0.0)))
    return 1.0 - g


def es_frame_of(subject: Subject, cfg: PhantomConfig) -> int:
    """End-systolic frame index (ED is frame 0)."""
    if cfg.n_frames < 2:
        return 0
    return int(min(cfg.n_frames - 1, max(1, round(subject.lv["es_phase"] * cfg.n_frames))))


def _state(sub: Subject, frame: int, cfg: PhantomConfig) -> dict:
    """Scalar geometry of frame `frame` (Python floats, so float32 arrays stay float32)."""
    lv, rv = sub.lv, sub.rv
    es_f = es_frame_of(sub, cfg)
    es_phase = es_f / cfg.n_frames if cfg.n_frames > 1 else lv["es_phase"]
    s = _contraction(frame / cfg.n_frames, es_phase) if cfg.n_frames > 1 else 0.0
    vol = (lv["edv"] - (lv["edv"] - lv["esv"]) * s) * 1000.0
    d = lv["mapse"] * s
    length = lv["length"] - d
    r = math.sqrt(3 * vol / (2 * math.pi * length))
    apex = lv["apex"] * (1 + 0.4 * s)
    lp = length + apex
    rp = math.sqrt(3 * (vol + lv["v_myo"]) / (2 * math.pi * lp))
    rv_base = rv["base"] + rv["tapse"] * s
    rp0 = math.sqrt(3 * (lv["edv"] * 1000.0 + lv["v_myo"]) / (2 * math.pi * (lv["length"] + lv["apex"])))
    # the LV contracts toward a nearly fixed septum: its axis shifts septally (-a) by the epicardial radius change
    shift = rp0 - rp
    return dict(s=s, base=d, L=length, R=r, Lp=lp, Rp=rp, R0=lv["r0"], shift=shift,
                rv_base=rv_base, rv_L=rv["length"] - rv["tapse"] * s,
                rv_ra=rv["ra"] * (1 - rv["shortening"] * s), rv_rb=rv["rb"] * (1 - 0.5 * rv["shortening"] * s),
                atrial=1.0 + 0.12 * s)


def _lv_radii(sub: Subject, st: dict, cos_a, sin_a, z):
    """Endocardial and epicardial equatorial radii (mm) per direction (cos, sin in the a-b plane) and depth z."""
    lv = sub.lv
    re, rp = st["R"], st["Rp"]
    if lv["septal"]:
        rp = rp + lv["septal"] * np.square(np.minimum(cos_a, 0.0))
    inf = lv["infarct"]
    if inf is not None:
        cosd = cos_a * inf["dir"][0] + sin_a * inf["dir"][1]
        w = np.clip((cosd - inf["cos_half"]) / (1 - inf["cos_half"]) * 2.5, 0.0, 1.0)
        w = w * np.clip((z / st["L"] - 0.1) * 4.0, 0.0, 1.0)
        # akinetic: the segment keeps its ED position in the heart frame although the LV axis shifts septally
        r_fixed = st["R0"] + st["shift"] * cos_a
        re = re + w * (r_fixed - re)
        rp = rp + w * (r_fixed + inf["scar"] - rp)
    return re, rp


def _cut(arr, box):
    """`arr` (broadcast-compatible with the grid) restricted to the index box `box` of the grid."""
    return arr[tuple(s if n > 1 else slice(None) for s, n in zip(box, np.shape(arr)))]


def _lv_quadrics(sub: Subject, st: dict, al, b, z):
    """q_endo, q_epi: squared radial distance over the squared endo- / epicardial radius (1 on the surface)."""
    r2 = al * al + b * b
    if sub.lv["septal"] or sub.lv["infarct"] is not None:
        inv_r = 1.0 / np.sqrt(r2 + 1e-6)
        re, rp = _lv_radii(sub, st, al * inv_r, b * inv_r, z)
        return r2 / np.square(re), r2 / np.square(rp)
    return r2 * (1.0 / st["R"] ** 2), r2 * (1.0 / st["Rp"] ** 2)


def _part_bounds(sub: Subject, st: dict) -> np.ndarray:
    """Heart-frame boxes (5, 2, 3) (mm) holding LV, RV, LA, RA and aorta at this frame (each part is only evaluated
    inside its box on a view grid: speed). Derived from the shape formulas in `_heart` / `_vessels`, plus 1 mm."""
    lv, rv, ves = sub.lv, sub.rv, sub.vessels
    scar = lv["infarct"]["scar"] if lv["infarct"] is not None else 0.0
    rmax = max(st["Rp"], st["R0"] + abs(st["shift"]) + scar) + lv["septal"]
    parts = [[[-st["shift"] - rmax, -rmax, st["base"]], [-st["shift"] + rmax, rmax, st["base"] + st["Lp"]]]]
    w = rv["wall"]
    ra = st["rv_ra"] + w
    rb = st["rv_rb"] * ra / st["rv_ra"]
    parts.append([[rv["centre_a"] - ra, -rb, st["rv_base"]], [rv["clip_a"] + w, rb, st["rv_base"] + st["rv_L"] + w]])
    s, k = math.sqrt(1.25), st["atrial"]
    for centre, radii, level in ((ves["la_centre"], ves["la_radii"], st["base"]),
                                 (ves["ra_centre"], ves["ra_radii"], st["rv_base"])):
        half = np.array([s * radii[0] * k, s * radii[1] * k, s * radii[2]])
        cc = np.array([centre[0], centre[1], centre[2] + level])
        parts.append([cc - half, np.minimum(cc + half, [np.inf, np.inf, level])])
    p0 = np.array([ves["ao_root"][0], ves["ao_root"][1], st["base"]])
    p1 = p0 + ves["ao_len"] * np.asarray(ves["ao_dir"])
    pad = ves["ao_r"] + 2.5
    parts.append([np.minimum(p0, p1) - pad, np.maximum(p0, p1) + pad])
    return np.asarray(parts, np.float64) + np.array([[-1.0], [1.0]])


_PARTS = ("lv", "rv", "la", "ra", "ao")


def _part_boxes(sub: Subject, st: dict, geo: dict) -> dict:
    """Index boxes of a view grid (`geo`) per heart part; None where the part misses the grid."""
    bounds = _part_bounds(sub, st)
    sel = np.array([[i, j, k] for i in (0, 1) for j in (0, 1) for k in (0, 1)])
    corners = bounds[:, sel, [0, 1, 2]]  # (5, 8, 3)
    rel = sub.centre + corners @ sub.axes - geo["origin"]
    lo_hi = []
    for k, n in enumerate(geo["shape"]):
        e = (geo["e1"], geo["e2"], geo["e3"])[k]
        idx = rel @ e / geo["spacing"][k]
        lo = np.clip(np.floor(idx.min(1)) - 1, 0, n).astype(int)
        hi = np.clip(np.ceil(idx.max(1)) + 2, 0, n).astype(int)
        lo_hi.append((lo, hi))
    out = {}
    for p, name in enumerate(_PARTS):
        box = tuple(slice(int(lo[p]), int(hi[p])) for lo, hi in lo_hi)
        out[name] = None if any(sl.stop <= sl.start for sl in box) else box
    return out


# ------------------------------------------------------------------------------------------------- implicit geometry
def _heart(sub: Subject, st: dict, a, b, c, bg=None, boxes=None):
    """Label (uint8, ACDC order) and, when `bg` (tissue classes of the surroundings) is given, tissue classes.

    a, b, c: float32 heart-frame coordinates (mm) of broadcast-compatible shapes. For SAX grids a, b are
    (X, Y, 1) and c is (1, 1, Z) (planes perpendicular to the long axis), so most work stays 2-D or 1-D and only
    the final comparisons touch the full grid. `boxes` (from `_part_boxes`, grid arrays only) restricts each part
    to its index box; without it every part is evaluated everywhere (the reference, used by `labels_at`).
    """
    rv = sub.rv
    shape = np.broadcast_shapes(np.shape(a), np.shape(b), np.shape(c))
    full = (slice(None),) * len(shape)
    boxes = boxes or dict.fromkeys(_PARTS, full)
    inf = np.float32(np.inf)
    label = np.zeros(shape, np.uint8)
    cls = None
    if bg is not None:
        cls = np.array(np.broadcast_to(bg, shape), dtype=np.uint8, copy=True)
        _vessels(sub, st, a, b, c, cls, boxes)

    box = boxes["rv"]
    if box is not None:
        ar, br, cr = (_cut(v, box) for v in (a, b, c))
        zr = cr - st["rv_base"]
        fr = np.where(zr >= 0, 1.0 - np.square(zr * (1.0 / st["rv_L"])), -inf)
        q_rv = np.square((ar - rv["centre_a"]) * (1.0 / st["rv_ra"])) + np.square(br * (1.0 / st["rv_rb"]))
        rv_cav = np.where(ar < rv["clip_a"], q_rv, inf) < fr
        w = rv["wall"]
        if cls is not None:
            fw = np.where(zr >= 0, (1.0 - np.square(zr * (1.0 / (st["rv_L"] + w))))
                          * ((st["rv_ra"] + w) / st["rv_ra"]) ** 2, -inf)
            rv_wall = np.where(ar < rv["clip_a"] + w, q_rv, inf) < fw
        if st["rv_base"] < st["base"]:
            # the LV outflow / mitral column above the LV base never becomes RV (the RV, at zr >= 0, lies below the
            # LV base whenever rv_base >= base, the usual case, so this is only needed otherwise)
            z = cr - st["base"]
            _, q_epi = _lv_quadrics(sub, st, ar + st["shift"], br, z)
            lv_column = (q_epi < 1.0) & (z < 0)
            rv_cav &= ~lv_column
            if cls is not None:
                rv_wall &= ~lv_column
        np.copyto(label[box], 1, where=rv_cav)
        if cls is not None:
            cbox = cls[box]
            np.copyto(cbox, _MYO, where=rv_wall)
            np.copyto(cbox, _BLOOD, where=rv_cav)

    box = boxes["lv"]
    if box is not None:
        al = _cut(a, box) + st["shift"]  # a relative to the current LV axis
        bl = _cut(b, box)
        z = _cut(c, box) - st["base"]
        above = z >= 0
        zl2 = np.where(above, np.square(z * (1.0 / st["L"])), inf)
        zp2 = np.where(above, np.square(z * (1.0 / st["Lp"])), inf)
        q_endo, q_epi = _lv_quadrics(sub, st, al, bl, z)
        endo = q_endo + zl2 < 1.0
        epi = q_epi + zp2 < 1.0
        lbox = label[box]
        np.copyto(lbox, 2, where=epi)
        np.copyto(lbox, 3, where=endo)
        if cls is not None:
            cbox = cls[box]
            np.copyto(cbox, _MYO, where=epi)
            np.copyto(cbox, _BLOOD, where=endo)
    return label, cls


def _vessels(sub: Subject, st: dict, a, b, c, cls, boxes) -> None:
    """Paint atria (above the valve planes) and the ascending aorta, with thin walls, into `cls` in place."""
    ves = sub.vessels
    inf = np.float32(np.inf)
    k = st["atrial"]
    for name, centre, radii, level in (
        ("la", ves["la_centre"], ves["la_radii"], st["base"]),
        ("ra", ves["ra_centre"], ves["ra_radii"], st["rv_base"]),
    ):
        box = boxes[name]
        if box is None:
            continue
        av, bv, cv = (_cut(v, box) for v in (a, b, c))
        qc = np.where(cv - level < 0, np.square((cv - (centre[2] + level)) * (1 / radii[2])), inf)
        q = np.square((av - centre[0]) * (1 / (radii[0] * k))) + np.square((bv - centre[1]) * (1 / (radii[1] * k))) + qc
        cbox = cls[box]
        np.copyto(cbox, _MYO, where=q < 1.25)
        np.copyto(cbox, _VBLOOD, where=q < 1.0)
    box = boxes["ao"]
    if box is None:
        return
    av, bv, cv = (_cut(v, box) for v in (a, b, c))
    ar, ad = ves["ao_root"], ves["ao_dir"]
    z = cv - st["base"]
    va, vb = av - ar[0], bv - ar[1]
    along = (va * ad[0] + vb * ad[1]) + z * ad[2]
    perp2 = (va * va + vb * vb) + z * z - along * along
    perp2 = np.where((along > 0) & (along < ves["ao_len"]), perp2, inf)
    rad = ves["ao_r"]
    cbox = cls[box]
    np.copyto(cbox, _MYO, where=perp2 < (rad + 2.5) ** 2)
    np.copyto(cbox, _VBLOOD, where=perp2 < rad * rad)


def _background(sub: Subject, x, y, z, with_parts: bool = False):
    """Tissue classes of the static surroundings from patient-frame coordinates (mm, float32 arrays).

    with_parts: also return a uint16 code with one bit per inside/outside test (body layers, diaphragm, lungs,
    mediastinum, liver side, spine, aorta); `_background_grid` refines every block in which any bit changes.
    """
    shape = np.broadcast_shapes(x.shape, y.shape, z.shape)
    bx, by = sub.vessels["body"]
    x2 = np.square(x)
    q_body = np.square(x * (1 / bx))
    q_body += np.square(y * (1 / by))
    inner = q_body < 0.74
    tests = [q_body > 0.74, q_body > 0.86, q_body >= 1.0]
    cls = np.full(shape, _SOFT, np.uint8)
    for value, mask in zip((_MUSCLE, _FAT, _AIR), tests):
        np.copyto(cls, value, where=mask)
    # diaphragm dome: higher on the right (x < 0), liver below it on the right, stomach / bowel (soft) on the left
    zd = -55.0 - 0.0015 * x2 + 12.0 * np.tanh(-x * (1 / 60.0))
    dome = z < zd
    below = dome & inner
    lung = (np.square((np.abs(x) - 78.0) * (1 / 62.0)) + np.square((y - 15.0) * (1 / 80.0))
            + np.square((z - 40.0) * (1 / 140.0))) < 1.0
    mc, mr = sub.vessels["mediastinum"], sub.vessels["mediastinum_radii"]
    med = (np.square((x - mc[0]) * (1 / mr[0])) + np.square((y - mc[1]) * (1 / mr[1]))
           + np.square((z - mc[2]) * (1 / mr[2]))) < 1.0
    np.copyto(cls, _LUNG, where=lung & ~below & ~med)
    right = x < 45.0
    np.copyto(cls, _LIVER, where=below & right)
    spine = x2 + np.square(y - 88.0) < 19.0 ** 2
    np.copyto(cls, _BONE, where=spine)
    dao = np.square(x - 24.0) + np.square(y - 62.0) < 12.0 ** 2
    np.copyto(cls, _VBLOOD, where=dao & inner)
    if not with_parts:
        return cls
    code = np.zeros(shape, np.uint16)
    for bit, mask in enumerate(tests + [dome, lung, med, right, spine, dao]):
        code |= mask.astype(np.uint16) << bit
    return cls, code


def labels_at(subject: Subject, frame: int, points_mm: np.ndarray, cfg: PhantomConfig = PhantomConfig()) -> np.ndarray:
    """Label (uint8, ACDC order) of the 3-D geometry at patient-frame points (..., 3) in mm at `frame`.

    This is the one implicit function every view samples; tests use it to check cross-view agreement.
    """
    pts = np.asarray(points_mm, dtype=np.float64)
    h = ((pts - subject.centre) @ subject.axes.T).astype(np.float32)
    label, _ = _heart(subject, _state(subject, frame, cfg), h[..., 0], h[..., 1], h[..., 2])
    return label


# --------------------------------------------------------------------------------------------------------- view grids
def view_geometry(subject: Subject, view: str, cfg: PhantomConfig = PhantomConfig()) -> dict:
    """Grid of a view: origin (patient mm of pixel/voxel index 0), unit axes e1, e2, e3, spacing (mm), shape, and
    the 4x4 index -> patient-mm affine (columns e1*dx, e2*dy, e3*dz, origin; LAX: the third index is 0)."""
    if view not in VIEWS:
        raise ValueError(f"unknown view {view!r}; views are {VIEWS}")
    g = subject.views[view]
    if view == "sax":
        nx, ny = cfg.sax_size
        shape = (nx, ny, subject.n_sax)
        spacing = tuple(float(s) for s in cfg.sax_spacing)
    else:
        nx, ny = cfg.lax_size
        shape = (nx, ny)
        spacing = (float(cfg.lax_spacing[0]), float(cfg.lax_spacing[1]), 1.0)
    origin = g["centre"] - (nx - 1) / 2 * spacing[0] * g["e1"] - (ny - 1) / 2 * spacing[1] * g["e2"]
    affine = np.eye(4)
    affine[:3, 0] = g["e1"] * spacing[0]
    affine[:3, 1] = g["e2"] * spacing[1]
    affine[:3, 2] = g["e3"] * spacing[2]
    affine[:3, 3] = origin
    return dict(origin=origin, e1=g["e1"], e2=g["e2"], e3=g["e3"], spacing=spacing, shape=shape, affine=affine)


def view_points_mm(subject: Subject, view: str, cfg: PhantomConfig = PhantomConfig()) -> np.ndarray:
    """Patient-frame mm position of every pixel / voxel centre: (X, Y, 3) LAX or (X, Y, Z_data, 3) SAX."""
    geo = view_geometry(subject, view, cfg)
    idx = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in geo["shape"]], indexing="ij"), -1)
    steps = np.stack([geo["e1"] * geo["spacing"][0], geo["e2"] * geo["spacing"][1], geo["e3"] * geo["spacing"][2]])
    return geo["origin"] + idx @ steps[: idx.shape[-1]]


def _grid_coords(geo: dict, rows: np.ndarray, ref: np.ndarray, offset_mm: float = 0.0) -> list[np.ndarray]:
    """Coordinates (rows . (p - ref)) of every grid point as float32 arrays built from 1-D terms (cheap).

    A term whose step is (numerically) zero is dropped, so e.g. the heart-frame a, b of a SAX grid come out as
    (X, Y, 1) and c as (1, 1, Z); callers rely on broadcasting.
    """
    steps = [geo["e1"] * geo["spacing"][0], geo["e2"] * geo["spacing"][1], geo["e3"] * geo["spacing"][2]]
    shape = geo["shape"]
    base = geo["origin"] + offset_mm * geo["e3"] - ref
    out = []
    for row in rows:
        const = float(np.dot(row, base))
        arr = None
        for k, n in enumerate(shape):
            coef = float(np.dot(row, steps[k]))
            if abs(coef) < 1e-9 and n > 1:
                continue
            term = np.arange(n, dtype=np.float64) * coef
            if arr is None:
                term = term + const
            view_shape = [1] * len(shape)
            view_shape[k] = n
            term = term.astype(np.float32).reshape(view_shape)
            arr = term if arr is None else arr + term
        if arr is None:
            arr = np.full((1,) * len(shape), const, np.float32)
        out.append(arr)
    return out


def _separable_field(geo: dict, ref: np.ndarray, lin: np.ndarray, quad: float, fn, const: float = 0.0,
                     dtype=np.float64):
    """fn(const + lin . (p - ref) + quad |p - ref|^2) on a view grid, as an outer product of 1-D factors.

    Exact, because the grid axes are orthonormal: both the linear and the squared-distance term split into sums of
    per-axis terms, and fn = exp turns sums into products. Used for the bias field (exp) and the phase (exp(i .)).
    """
    u = geo["origin"] - ref
    steps = (geo["e1"], geo["e2"], geo["e3"])
    shape = geo["shape"]
    rest = float(np.dot(u, u)) - sum(float(np.dot(u, e)) ** 2 for e in steps[: len(shape)])
    out = None
    for k, n in enumerate(shape):
        pos = np.arange(n, dtype=np.float64) * geo["spacing"][k] + float(np.dot(u, steps[k]))
        arg = float(np.dot(lin, steps[k])) * pos + quad * pos * pos
        if k == 0:
            arg = arg + const + float(np.dot(lin, u - sum(float(np.dot(u, e)) * e for e in steps[: len(shape)])))
            arg = arg + quad * rest
        view_shape = [1] * len(shape)
        view_shape[k] = n
        term = fn(arg).astype(dtype).reshape(view_shape)  # 1-D factors in float64, the product in `dtype`
        out = term if out is None else out * term
    return out


def _subplane_offsets(thickness: float, cfg: PhantomConfig) -> list[float]:
    """Through-plane sample offsets (mm) for a slab of `thickness`: centre first (the label plane)."""
    if cfg.max_subplanes < 3 or thickness < 4.5:
        return [0.0]
    return [0.0, -thickness / 3.0, thickness / 3.0]


# ------------------------------------------------------------------------------------------------------------ render
def _frames_list(frames, cfg: PhantomConfig) -> list[int]:
    if frames is None:
        return list(range(cfg.n_frames))
    if np.isscalar(frames):
        return [int(frames)]
    return [int(f) for f in frames]


def _heart_bounds(sub: Subject, cfg: PhantomConfig) -> np.ndarray:
    """Conservative heart-frame box (2, 3) (mm) holding every heart structure over the whole cycle."""
    lv, rv, ves = sub.lv, sub.rv, sub.vessels
    sts = [_state(sub, t, cfg) for t in (0, es_frame_of(sub, cfg))]
    rp = max(max(st["Rp"] for st in sts), lv["r0"] + (lv["infarct"] or {}).get("scar", 0.0)) + lv["septal"]
    g = 1.12 * 1.13  # atrial wall (q < 1.25) and atrial filling (x 1.12)
    la_c, la_r = ves["la_centre"], ves["la_radii"]
    ra_c, ra_r = ves["ra_centre"], ves["ra_radii"]
    rv_a = rv["ra"] + rv["wall"]
    rv_b = (rv["rb"] + rv["wall"]) * (rv["ra"] + rv["wall"]) / rv["ra"]
    ao_end = np.array(ves["ao_root"] + (0.0,)) + ves["ao_len"] * np.array(ves["ao_dir"])
    ao_pad = ves["ao_r"] + 3.0
    lo = np.array([
        min(-rp, rv["centre_a"] - rv_a, ra_c[0] - g * ra_r[0], la_c[0] - g * la_r[0], ao_end[0] - ao_pad),
        min(-rp, -rv_b, ra_c[1] - g * ra_r[1], la_c[1] - g * la_r[1], ao_end[1] - ao_pad, -ao_pad),
        min(la_c[2] - g * la_r[2], ra_c[2] + rv["base"] - g * ra_r[2], ao_end[2] - ao_pad),
    ])
    hi = np.array([
        max(rp, la_c[0] + g * la_r[0], ves["ao_root"][0] + ao_pad),
        max(rp, rv_b, ra_c[1] + g * ra_r[1], la_c[1] + g * la_r[1], ao_end[1] + ao_pad,
            ves["ao_root"][1] + ao_pad),
        max(lv["length"] + 1.4 * lv["apex"], rv["base"] + rv["length"] + rv["wall"] + rv["tapse"]) + lv["mapse"],
    ])
    return np.stack([lo - 4.0, hi + 4.0])


def _heart_box(sub: Subject, geo: dict, offsets: list[float], cfg: PhantomConfig) -> tuple[slice, ...]:
    """Index box of a view grid that the heart can reach (the heart is only evaluated there: speed)."""
    bounds = _heart_bounds(sub, cfg)
    corners = np.array([[bounds[i, 0], bounds[j, 1], bounds[k, 2]] for i in (0, 1) for j in (0, 1) for k in (0, 1)])
    pts = sub.centre + corners @ sub.axes
    box = []
    for k, n in enumerate(geo["shape"]):
        e = (geo["e1"], geo["e2"], geo["e3"])[k]
        idx = (pts - geo["origin"]) @ e / geo["spacing"][k]
        shift = max(abs(o) for o in offsets) * abs(float(np.dot(geo["e3"], e))) / geo["spacing"][k]
        lo = int(max(0, math.floor(idx.min() - shift) - 1))
        hi = int(min(n, math.ceil(idx.max() + shift) + 2))
        box.append(slice(lo, max(lo, hi)))
    return tuple(box)


def _sub_geometry(geo: dict, box: tuple[slice, ...]) -> dict:
    steps = (geo["e1"], geo["e2"], geo["e3"])
    origin = geo["origin"] + sum(sl.start * geo["spacing"][k] * steps[k] for k, sl in enumerate(box))
    return dict(geo, origin=origin, shape=tuple(sl.stop - sl.start for sl in box))


def _slice_geometry(geo: dict, z: int) -> dict:
    """The SAX grid cut to its data slice z (depth 1)."""
    nx, ny, nz = geo["shape"]
    if not 0 <= z < nz:
        raise ValueError(f"SAX slice {z} is outside the subject's data slices 0..{nz - 1}")
    origin = geo["origin"] + z * geo["spacing"][2] * geo["e3"]
    affine = geo["affine"].copy()
    affine[:3, 3] = origin
    return dict(geo, origin=origin, shape=(nx, ny, 1), affine=affine)


def _background_grid(sub: Subject, geo: dict, block: int = 4) -> np.ndarray:
    """Tissue classes of the surroundings on a whole view grid (speed: coarse grid, refined near boundaries).

    The classes are evaluated on a grid `block` times coarser in-plane; blocks whose four corners pass the same
    inside/outside tests take the corner class, the others (every boundary crossing, also thin wedges between two
    surfaces) are evaluated per pixel. Only a surface that enters and leaves one block between its corners (a plane
    grazing an ellipsoid) could be missed; labels never use this.
    """
    shape = geo["shape"]
    nx, ny = shape[0], shape[1]
    cnx, cny = -(-(nx - 1) // block) + 1, -(-(ny - 1) // block) + 1
    if cnx < 3 or cny < 3:
        return _background(sub, *_grid_coords(geo, np.eye(3), np.zeros(3)))
    sp = geo["spacing"]
    cgeo = dict(geo, spacing=(sp[0] * block, sp[1] * block, sp[2]), shape=(cnx, cny) + tuple(shape[2:]))
    coarse, code = _background(sub, *_grid_coords(cgeo, np.eye(3), np.zeros(3)), with_parts=True)
    k00 = code[:-1, :-1]
    mixed = (k00 != code[1:, :-1]) | (k00 != code[:-1, 1:]) | (k00 != code[1:, 1:])
    full = np.repeat(np.repeat(coarse[:-1, :-1], block, 0), block, 1)  # may overhang the grid by < block
    blk = np.nonzero(mixed)
    if blk[0].size:
        # pixel centres of every mixed block: block corner (one per block) + in-block offsets (block^2)
        di, dj = np.divmod(np.arange(block * block, dtype=np.float64), block)
        steps = [geo[e] * s for e, s in zip(("e1", "e2", "e3"), sp)]
        corner = geo["origin"] + sum(np.multiply.outer(i * float(block if k < 2 else 1), steps[k])
                                     for k, i in enumerate(blk))  # (n_blocks, 3)
        offs = np.multiply.outer(di, steps[0]) + np.multiply.outer(dj, steps[1])  # (block^2, 3)
        pts = [(corner[:, None, r] + offs[None, :, r]).astype(np.float32) for r in range(3)]
        cls = _background(sub, *pts).reshape((-1, block, block))
        view = full.reshape((cnx - 1, block, cny - 1, block) + full.shape[2:])
        view[(blk[0], slice(None), blk[1], slice(None)) + tuple(blk[2:])] = cls
    return np.ascontiguousarray(full[:nx, :ny])


def _add_rician(img: np.ndarray, sigma: float, rng: np.random.Generator) -> None:
    """img <- |img + sigma (n1 + i n2)| in place (Rician magnitude noise), n1, n2 standard normal (Box-Muller).

    Speed: one 64-bit draw gives four 16-bit uniforms; with u1, u2 uniform, r^2 = -2 ln u1 and theta = 2 pi u2,
    |c + sigma r e^(i theta)|^2 = c (c + 2 x) + sigma^2 r^2 with x = sigma r cos(theta), so no sine is needed.
    """
    flat = img.reshape(-1)
    n = flat.size
    u = rng.bit_generator.random_raw(-(-n // 2)).view(np.uint16)
    chunk = 1 << 15  # work in cache-sized pieces
    r2 = np.empty(min(n, chunk), np.float32)
    x = np.empty_like(r2)
    r = np.empty_like(r2)
    for i in range(0, n, chunk):
        m = min(chunk, n - i)
        c, r2m, xm, rm = flat[i:i + m], r2[:m], x[:m], r[:m]
        np.multiply(u[i:i + m], np.float32(1.0 / 65536.0), out=r2m, dtype=np.float32)
        r2m += 0.5 / 65536.0
        np.log(r2m, out=r2m)
        r2m *= -2.0 * sigma * sigma  # sigma^2 r^2
        np.multiply(u[n + i:n + i + m], np.float32(2.0 * math.pi / 65536.0), out=xm, dtype=np.float32)
        np.cos(xm, out=xm)
        np.sqrt(r2m, out=rm)
        xm *= rm  # sigma r cos(theta): N(0, sigma^2)
        xm *= 2.0
        xm += c
        xm *= c
        xm += r2m
        np.maximum(xm, 0.0, out=xm)  # float32 rounding when img + noise ~ 0
        np.sqrt(xm, out=c)


def _render_view(sub: Subject, view: str, frames: list[int], cfg: PhantomConfig, labels: bool,
                 complex_image: bool, z_index: int | None = None, magnitude: bool = True) -> dict:
    """One view's frames; `z_index` renders that SAX slice alone (grid of depth 1); `magnitude=False` skips the
    magnitude image and its Rician noise (for complex-only callers)."""
    geo = view_geometry(sub, view, cfg)
    if z_index is not None:
        geo = _slice_geometry(geo, z_index)
    shape = geo["shape"]
    site = sub.site
    lut = np.array([site["contrast"][t] for t in TISSUES], np.float32)
    offsets = _subplane_offsets(site["thickness_mm"], cfg)
    n_sub = len(offsets)
    box = _heart_box(sub, geo, offsets, cfg)
    box_geo = _sub_geometry(geo, box)
    hearts = [_grid_coords(box_geo, sub.axes, sub.centre, o) for o in offsets]
    sub_geos = [dict(box_geo, origin=box_geo["origin"] + o * box_geo["e3"]) for o in offsets]
    bg = _background_grid(sub, geo)
    bg_box = np.ascontiguousarray(bg[box])
    # smooth multiplicative coil field and smooth phase, both defined in the patient frame (views agree)
    bc = sub.bias_coef * site["bias"]
    bias = _separable_field(geo, sub.centre, bc[:3] / 150.0, bc[3] / 150.0 ** 2, np.exp, dtype=np.float32)
    base_img = np.take(lut, bg, mode="clip")
    base_img *= bias
    bias_box = np.ascontiguousarray(bias[box])
    # mean intensity of the sub-plane classes in one table lookup: code = sum_j cls_j * 10^j
    n_t = len(TISSUES)
    mean_lut = np.zeros((n_t,) * n_sub, np.float32)
    for j in range(n_sub):
        mean_lut = mean_lut + lut.reshape((n_t,) + (1,) * j)
    mean_lut = (mean_lut * (1.0 / n_sub)).astype(np.float32).ravel()
    if complex_image:
        pc = sub.phase_coef
        phasor = _separable_field(geo, sub.centre, pc[1:4] * (math.pi / 250.0), pc[4] * 0.5 / 150.0 ** 2,
                                  lambda v: np.exp(1j * v), const=float(pc[0]), dtype=np.complex64)
    res = site["resolution_mm"]
    sig = 0.45 * math.sqrt(max(res * res - geo["spacing"][0] ** 2, 0.0)) / geo["spacing"][0]
    sigma = (sig, sig, 0.0) if view == "sax" else (sig, sig)
    noise = site["noise"] * site["contrast"]["blood"]
    vid = VIEWS.index(view)
    depth = (1 if z_index is not None else cfg.n_slices,) if view == "sax" else ()
    full_shape = (len(frames),) + tuple(shape[:2]) + depth
    data = (slice(None),) * 2 + ((slice(0, shape[-1]),) if view == "sax" else ())
    out_img = np.zeros(full_shape, np.float32) if magnitude else None
    out_lab = np.zeros(full_shape, np.uint8) if labels else None
    out_cplx = np.zeros(full_shape, np.complex64) if complex_image else None
    for ti, t in enumerate(frames):
        st = _state(sub, t, cfg)
        code = None
        for j, (a, b, c) in enumerate(hearts):
            lab, cls = _heart(sub, st, a, b, c, bg_box, _part_boxes(sub, st, sub_geos[j]))
            if j == 0:
                code = cls.astype(np.uint16) if n_sub > 1 else cls
                if labels:
                    out_lab[ti][data][box] = lab
            else:
                cls = cls.astype(np.uint16)
                cls *= n_t ** j
                code += cls
        img = base_img.copy()
        heart_img = np.take(mean_lut, code, mode="clip")
        heart_img *= bias_box
        img[box] = heart_img
        if sig > 0.3:
            img = ndimage.gaussian_filter(img, sigma, mode="nearest", truncate=3.0)
        if complex_image:
            np.multiply(phasor, img * (1.0 / max(float(img.max()), 1e-6)), out=out_cplx[ti][data])
        if not magnitude:
            continue
        if noise > 0:
            rng = np.random.default_rng([sub.seed & 0xFFFFFFFF, sub.index & 0xFFFFFFFF, 0x401, int(t), vid])
            _add_rician(img, noise, rng)
        lo, hi = float(img.min()), float(img.max())
        img -= lo
        img *= 1.0 / max(hi - lo, 1e-6)
        np.clip(img, 0.0, 1.0, out=out_img[ti][data])  # float32 rounding may overshoot 1 by an ulp
    out = {view: out_img} if magnitude else {}
    if labels:
        out[f"{view}_label"] = out_lab
    if complex_image:
        out[f"{view}_complex"] = out_cplx
    out[f"{view}_spacing"] = np.asarray(geo["spacing"][: 3 if view == "sax" else 2], np.float32)
    out[f"{view}_affine"] = geo["affine"]
    if view != "sax":
        lm = np.stack([landmarks_mm_3d(sub, view, t, cfg) for t in frames])  # (T, 3, 3) patient mm
        rel = lm - geo["origin"]
        px = np.stack([rel @ geo["e1"] / geo["spacing"][0], rel @ geo["e2"] / geo["spacing"][1]], -1)
        out[f"{view}_landmarks"] = px.astype(np.float32)
        out[f"{view}_landmarks_mm"] = (px * np.asarray(geo["spacing"][:2])).astype(np.float32)
    return out


def landmarks_mm_3d(subject: Subject, view: str, frame: int, cfg: PhantomConfig = PhantomConfig()) -> np.ndarray:
    """(3, 3) patient-mm positions of mitral hinge 1, hinge 2 and the (epicardial) LV apex in a LAX plane.

    Hinges are where the plane cuts the mitral annulus (endocardial radius at the valve plane): hinge 1 on the
    -d side of the plane's in-plane direction d (septal / inferior / inferolateral for 4C / 2C / 3C), hinge 2 on +d.
    """
    st = _state(subject, frame, cfg)
    da, db = subject.views[view]["dir_ab"]
    pts = []
    for sgn in (-1.0, 1.0):
        ca, sa = sgn * da, sgn * db
        re, _ = _lv_radii(subject, st, np.float64(ca), np.float64(sa), np.float64(0.0))
        pts.append([float(re) * ca - st["shift"], float(re) * sa, st["base"]])
    pts.append([-st["shift"], 0.0, st["base"] + st["Lp"]])
    return subject.centre + np.asarray(pts) @ subject.axes


def render(subject: Subject, frames=None, views: Sequence[str] = VIEWS, cfg: PhantomConfig = PhantomConfig(),
           labels: bool = True, complex_image: bool = False) -> dict[str, np.ndarray]:
    """Render frames (int, list, or None = the whole cycle) of the chosen views.

    Returns '<view>' float32 (T, X, Y, Z) SAX / (T, X, Y) LAX, min-max scaled to [0, 1] per frame and view (SAX
    slices past `subject.n_sax` are zero, like CineMA's end padding); '<view>_label' uint8 same shape (0 BG, 1 RV,
    2 MYO, 3 LV); '<lax view>_landmarks' float32 (T, 3, 2) pixel (x, y) of mv hinge 1, hinge 2, apex and
    '<lax view>_landmarks_mm' the same in in-plane mm (pixel x spacing); '<view>_spacing' float32 mm;
    '<view>_affine' float64 (4, 4) index -> patient mm; '<view>_complex' complex64 (noise-free magnitude scaled to
    max 1, times a smooth phase) when `complex_image`.
    """
    frames = _frames_list(frames, cfg)
    out = {}
    for view in views:
        if view not in VIEWS:
            raise ValueError(f"unknown view {view!r}; views are {VIEWS}")
        out.update(_render_view(subject, view, frames, cfg, labels, complex_image))
    return out


def render_complex_plane(subject: Subject, view: str, slice_index: int = 0, frames=None,
                         cfg: PhantomConfig = PhantomConfig()) -> np.ndarray:
    """(T, X, Y) complex64 of one LAX view or one SAX slice: noise-free magnitude scaled to max 1 per frame, times
    the smooth phase (`render`'s '<view>_complex', but normalised over the plane rather than the volume).

    Why: the denoiser keeps one plane of a series; this renders only that plane and skips the magnitude image and
    its Rician noise, several times cheaper than `render` for SAX. SAX slices past `subject.n_sax` are zero, as in
    `render`'s end padding; `slice_index` is ignored for LAX views.
    """
    frames = _frames_list(frames, cfg)
    if view not in VIEWS:
        raise ValueError(f"unknown view {view!r}; views are {VIEWS}")
    if view == "sax" and not 0 <= slice_index < cfg.n_slices:
        raise ValueError(f"SAX slice {slice_index} is outside 0..{cfg.n_slices - 1}")
    if view == "sax" and slice_index >= subject.n_sax:
        return np.zeros((len(frames),) + tuple(cfg.sax_size), np.complex64)
    out = _render_view(subject, view, frames, cfg, labels=False, complex_image=True,
                       z_index=slice_index if view == "sax" else None, magnitude=False)[f"{view}_complex"]
    return out[..., 0] if view == "sax" else out


# --------------------------------------------------------------------------------------------------------- metadata
def sax_label_volumes(subject: Subject, frames=None, cfg: PhantomConfig = PhantomConfig()) -> dict[str, np.ndarray]:
    """LV, RV cavity and myocardial volumes (mL) per frame from the SAX label volumes (voxel count x voxel volume)."""
    frames = _frames_list(frames, cfg)
    geo = view_geometry(subject, "sax", cfg)
    a, b, c = _grid_coords(geo, subject.axes, subject.centre)
    voxel_ml = float(np.prod(geo["spacing"])) / 1000.0
    out = {"lv": [], "rv": [], "myo": []}
    for t in frames:
        lab, _ = _heart(subject, _state(subject, t, cfg), a, b, c)
        counts = np.bincount(lab.ravel(), minlength=4)
        out["lv"].append(counts[3] * voxel_ml)
        out["rv"].append(counts[1] * voxel_ml)
        out["myo"].append(counts[2] * voxel_ml)
    return {k: np.asarray(v, np.float64) for k, v in out.items()}


def subject_metadata(subject: Subject, cfg: PhantomConfig = PhantomConfig()) -> dict:
    """ED/ES frames and LV/RV EDV, ESV (mL) and EF (%) measured on the rendered SAX labels at ED and ES.

    ED is frame 0 and ES the designed end-systolic frame (the volume curve's maximum and minimum); volumes count
    label voxels times the true voxel volume (1 x 1 x 10 mm = 0.01 mL by default).
    """
    ed, es = 0, es_frame_of(subject, cfg)
    vols = sax_label_volumes(subject, [ed, es], cfg)
    lv_edv, lv_esv = float(vols["lv"][0]), float(vols["lv"][1])
    rv_edv, rv_esv = float(vols["rv"][0]), float(vols["rv"][1])
    ef = lambda edv, esv: 100.0 * (edv - esv) / edv if edv > 0 else 0.0  # noqa: E731
    return {
        "ed_frame": ed, "es_frame": es,
        "lv_edv": lv_edv, "lv_esv": lv_esv, "lv_ef": ef(lv_edv, lv_esv),
        "rv_edv": rv_edv, "rv_esv": rv_esv, "rv_ef": ef(rv_edv, rv_esv),
        "lv_myo_ed": float(vols["myo"][0]),
        "phenotype": subject.phenotype, "phenotype_name": subject.phenotype_name,
        "site": {k: (dict(v) if isinstance(v, dict) else v) for k, v in subject.site.items()},
        "seed": subject.seed, "index": subject.index, "n_sax_slices": subject.n_sax,
    }
