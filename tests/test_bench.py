"""Benchmark harness on micro configs (JSON keys and sanity) and the FSDP all-gather check of the compiled step.

FSDP criterion (`classify_all_gathers`), on the compiled HLO of the MAE train step over 8 simulated devices:
  * every all-gather buffer (each buffer of a combined all-gather counts) must be either
      - a PARAMETER gather: its shape, size-1 dims dropped, equals the full shape of ONE parameter that the FSDP
        rules shard (spec names 'fsdp') — the per-layer weight gather FSDP needs; or
      - an ACTIVATION gather: its leading dim is the global batch (batch-sharded activations regathered by the SPMD
        partitioner around small gathers / reshapes; not parameters);
    anything else (a concatenated or stacked parameter tree, a replicated parameter, an unsharded weight) FAILS;
  * at least one parameter gather exists (the weights really are sharded and gathered per layer);
  * parameter-gather bytes <= 2 x the bytes of the FSDP-sharded parameters (one gather for the forward, at most one
    re-gather for the backward; gathering the tree once up front and keeping it would still pass this bound, which
    is why the per-buffer shape rule above is the main check);
  * on the data-parallel mesh (data=8) the compiled step has NO all-gather at all (parameters are replicated,
    gradients are all-reduced).
"""

import glob
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import jax
import pytest

from cinema_jax import bench
from cinema_jax.config import load_config

SPEC = "configs/bench.py"
TRAIN_KEYS = ("name", "device", "batch_size", "step_time_s", "samples_per_s", "flops_per_step",
              "achieved_flops_per_s", "matmul_peak_flops_per_s", "peak_fraction", "peak_memory_bytes",
              "compile_time_s")


def _run(name, *overrides, capsys=None):
    assert bench.main([f"--config={SPEC}:{name}", *[f"--config.{o}" for o in overrides]]) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.strip()]
    assert len(lines) == 1, lines
    return json.loads(lines[0])


def test_train_step_json(capsys):
    r = _run("mae_micro", "n_devices=1", "timed_steps=5", "matmul_size=256", capsys=capsys)
    for k in TRAIN_KEYS:
        assert k in r, k
    assert r["name"] == "mae_micro"
    assert r["device"]["count"] == 1 and r["device"]["kind"]
    assert r["batch_size"] == 2
    assert len(r["step_times_s"]) == 5 and r["step_time_s"] > 0
    assert r["flops_per_step"] > 0 and r["achieved_flops_per_s"] > 0 and r["matmul_peak_flops_per_s"] > 0
    assert 0 < r["peak_fraction"] < 1.5
    assert r["peak_memory_bytes"] > 0
    assert r["compile_time_s"] > 0
    assert r["device"]["host_malloc"] in ("glibc", "tcmalloc", "jemalloc", "mimalloc")
    cpu = r["host_cpu_s_per_step"]
    assert cpu["user"] > 0 and cpu["sys"] >= 0
    assert math.isfinite(r["loss_first"]) and math.isfinite(r["loss_last"])
    assert r["samples_per_s"] == pytest.approx(2 / r["step_time_s"])
    assert r["attention"] == "explicit" and r["conv"] == "tuned"  # 'auto' resolved on the CPU backend


def test_data_benchmarks_json(capsys):
    for name in ("synth_tiny", "record_tiny", "noise_tiny", "noise_h5_tiny"):
        r = _run(name, "data.n_samples=2", "data.consumer_samples_per_s=1.0", capsys=capsys)
        assert r["name"] == name
        assert r["samples_per_s_per_worker"] > 0 and r["grain_samples_per_s_per_worker"] > 0
        assert r["ratio_vs_consumer_per_worker"] == pytest.approx(r["samples_per_s_per_worker"])
        if name == "record_tiny":  # smoke sizes: SAX 32x32x4 + 3 LAX 32x32, 8 frames, uint8 per frame
            assert r["read_decode_samples_per_s"] > 0 and r["records"] == 2 and r["n_frames"] == 8
            assert 8 * (32 * 32 * 4 + 3 * 32 * 32) // 2 < r["bytes_per_record"] < 8 * 4 * (32 * 32 * 4 + 3 * 32 * 32)
            assert r["sample_shapes"]["sax"] == [32, 32, 4, 1]
        if name == "noise_tiny":  # smoke: host noise; the other path (the plan, noise in the step) is reported too
            assert r["noise_on_device"] is False and r["sample_shapes"]["image"] == [32, 32, 8, 3]
            assert r["other_path"]["noise_on_device"] is True and r["other_path"]["samples_per_s_per_worker"] > 0
            assert r["plan_only_samples_per_s_per_worker"] > 0 and r["noise_only_samples_per_s_per_worker"] > 0
        if name == "noise_h5_tiny":  # the h5 variant: noise in the step by default, cases read through the source
            assert r["source"] == "h5" and r["noise_on_device"] is True and r["case_shape"] == [40, 36, 6]
            assert r["sample_shapes"]["noise_lx"] == [32, 32] and r["sample_shapes"]["clean"] == [32, 32, 8, 2]
            assert r["other_path"]["noise_on_device"] is False


@pytest.mark.parametrize("lib", ["", "jemalloc"])
def test_host_malloc_names_the_preloaded_allocator(lib):
    """The bench labels its figures with the malloc in use (step times on CPU depend on it). tcmalloc's label is
    checked through launch/with_tcmalloc.sh (tests/train/test_launch.py)."""
    env = dict(os.environ, LD_PRELOAD="")
    if lib:
        dirs = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib", "/usr/local/lib")
        path = next((p for d in dirs for p in sorted(glob.glob(f"{d}/lib{lib}.so*")) if os.path.isfile(p)), None)
        if path is None:
            pytest.skip(f"lib{lib} is not installed here (Debian: apt-get install libjemalloc2)")
        env["LD_PRELOAD"] = path
    out = subprocess.run([sys.executable, "-c", "from cinema_jax.bench import host_malloc; print(host_malloc())"],
                         env=env, capture_output=True, text=True, check=True).stdout.strip()
    assert out == (lib or "glibc")


def test_bad_config_key_is_config_error():
    from cinema_jax.errors import ConfigError

    with pytest.raises(ConfigError):
        bench.main([f"--config={SPEC}:mae_micro", "--config.not_a_key=1"])
    with pytest.raises(ConfigError):
        bench.main(["--config.batch_size=2"])


def test_hlo_collective_parser():
    text = "\n".join([
        "  %all-gather.1 = f32[16,64]{1,0} all-gather(f32[2,64]{1,0} %p), channel_id=1, dimensions={0}",
        "  %ag = (bf16[8,4]{1,0}, f32[3]{0}) all-gather(bf16[1,4]{1,0} %a, f32[1]{0} %b), dimensions={0}",
        "  ROOT %all-reduce.2 = f32[10]{0} all-reduce(f32[10]{0} %g), to_apply=%add",
        "  %ags = (f32[2,64]{1,0}, f32[16,64]{1,0}) all-gather-start(f32[2,64]{1,0} %p), dimensions={0}",
        "  %agd = f32[16,64]{1,0} all-gather-done(%ags)",
        "  %x = f32[16,64]{1,0} add(%all-gather.1, %all-gather.1)",
    ])
    c = bench.hlo_collectives(text)
    assert c["all-gather"]["count"] == 3
    assert c["all-gather"]["shapes"] == [(16, 64), (8, 4), (3,), (16, 64)]
    assert c["all-gather"]["bytes"] == 16 * 64 * 4 + 8 * 4 * 2 + 3 * 4 + 16 * 64 * 4
    assert c["all-reduce"] == {"count": 1, "bytes": 40, "shapes": [(10,)]}


def _squeeze(shape):
    return tuple(d for d in shape if d != 1)


def classify_all_gathers(ts, compiled, global_batch):
    """(param_gathers, activation_gathers, unexpected) buffer shapes, plus sharded-param bytes (see docstring)."""
    leaves = jax.tree_util.tree_leaves(ts.abstract_params)
    specs = jax.tree_util.tree_leaves(ts.param_sharding)
    sharded = [x for x, s in zip(leaves, specs) if any(
        ax == "fsdp" or (isinstance(ax, tuple) and "fsdp" in ax) for ax in s.spec)]
    full_shapes = {_squeeze(x.shape) for x in sharded}
    sharded_bytes = sum(math.prod(x.shape) * x.dtype.itemsize for x in sharded)
    gathers = bench.hlo_collectives(compiled.as_text()).get("all-gather", {"shapes": []})["shapes"]
    params, acts, bad = [], [], []
    for shape in gathers:
        if _squeeze(shape) in full_shapes:
            params.append(shape)
        elif shape and shape[0] == global_batch:
            acts.append(shape)
        else:
            bad.append(shape)
    return params, acts, bad, sharded_bytes, len(sharded)


@pytest.fixture(scope="module")
def eight_devices():
    if len(jax.devices()) < 8:
        pytest.skip("needs 8 (simulated) devices: XLA_FLAGS=--xla_force_host_platform_device_count=8")
    return jax.devices()[:8]


def _compiled(mesh_overrides, devices, batch=8):
    cfg = load_config(f"{SPEC}:mae_micro", [f"batch_size={batch}", *mesh_overrides])
    ts = bench.TrainStep(cfg, devices, batch)
    compiled, _ = ts.compile()
    return ts, compiled


@pytest.fixture(scope="module")
def fsdp_step(eight_devices):
    return _compiled(["mesh.data=1", "mesh.fsdp=8"], eight_devices)


def test_fsdp_step_gathers_only_per_layer_weights(fsdp_step):
    ts, compiled = fsdp_step
    params, acts, bad, sharded_bytes, n_sharded = classify_all_gathers(ts, compiled, 8)
    assert n_sharded > 0, "no parameter is FSDP-sharded: the logical rules did not apply"
    assert not bad, f"unexpected all-gathers (not one FSDP-sharded weight, not a batch activation): {bad}"
    assert params, "FSDP step gathers no parameter: weights are not sharded over fsdp"
    gathered = sum(4 * math.prod(s) for s in params)
    assert gathered <= 2 * sharded_bytes, (gathered, sharded_bytes)


def test_data_parallel_step_has_no_all_gather(eight_devices):
    _, compiled = _compiled(["mesh.data=8", "mesh.fsdp=1"], eight_devices)
    coll = bench.hlo_collectives(compiled.as_text())
    assert "all-gather" not in coll, coll["all-gather"]["shapes"]
    assert coll.get("all-reduce", {}).get("count", 0) >= 1  # gradients are synchronised


def test_classifier_flags_a_whole_tree_gather(fsdp_step):
    """The criterion is failable: an HLO that gathers a concatenation of parameters is reported as unexpected."""
    ts, compiled = fsdp_step
    n_total = sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(ts.abstract_params))

    class Fake:
        def as_text(self):
            return compiled.as_text() + f"\n  %bad = f32[{n_total}]{{0}} all-gather(f32[{n_total // 8}]{{0}} %t)\n"

    _, _, bad, _, _ = classify_all_gathers(ts, Fake(), 8)
    assert bad == [(n_total,)]


@pytest.mark.slow
def test_memory_fit_and_scaling_tiny(capsys):
    r = _run("memory_fit_tiny", capsys=capsys)
    fit = r["sizes"]["tiny"]["largest_batch_per_device"]
    peaks = {row["batch_per_device"]: row["peak_bytes"] for row in r["sizes"]["tiny"]["compiles"]}
    # the reported fit is compiled and fits; the next batch was compiled too and does not (the budget binds < cap)
    assert 1 < fit < 8 and peaks[fit] <= r["budget_bytes"] < peaks[fit + 1]
    r = _run("scaling_tiny", capsys=capsys)
    assert [x["devices"] for x in r["weak"]] == [1, 2]
    assert all(x["step_time_s"] > 0 for x in r["weak"] + r["strong"])


def test_profile_dir_adds_a_per_op_summary(tmp_path):
    """`--config.profile_dir` traces one more step and sums its per-op time by kind, phase and model scope (on CPU
    the bench turns on XLA's per-thunk trace events itself, so it runs in a fresh process)."""
    cmd = [sys.executable, "-m", "cinema_jax.bench", "--config=configs/bench.py:denoise_tiny", "--config.timed_steps=1",
           "--config.warmup_steps=0", f"--config.profile_dir={tmp_path}", "--config.profile_depth=2"]
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True, cwd=Path(__file__).parents[1])
    r = json.loads(out.stdout.strip().splitlines()[-1])
    p = r["profile"]
    assert p["ops_traced"] > 50 and p["op_time_s"] > 0 and Path(p["trace"]).is_file()
    assert {"forward", "backward"} <= set(p["by_phase"])
    scopes = [row[0] for row in p["by_scope"]]
    assert any(s.startswith("forward: WeightedDenoisingModel/") for s in scopes), scopes
    assert all(s.count("/") <= 1 for s in scopes)  # profile_depth=2 keeps two module names
    assert abs(sum(row[2] for row in p["by_kind"]) - 1.0) < 0.5


def test_op_scope_parsing():
    from cinema_jax.step_profile import op_scopes, phase_and_scope

    hlo = """%fused_computation.3 (p: f32[4]) -> f32[4] {
  %p = f32[4]{0} parameter(0)
  ROOT %mul.1 = f32[4]{0} multiply(%p, %p), metadata={op_name="jit(step)/transpose(jvp(Model))/enc/block_0/mul"}
}

ENTRY %main (a: f32[4]) -> f32[4] {
  %a = f32[4]{0} parameter(0)
  %add.2 = f32[4]{0} add(%a, %a), metadata={op_name="jit(step)/jvp(Model)/enc/add"}
  ROOT %fusion.3 = f32[4]{0} fusion(%add.2), kind=kLoop, calls=%fused_computation.3
}
"""
    scopes = op_scopes(hlo)
    assert scopes["add.2"] == "jit(step)/jvp(Model)/enc/add"
    assert scopes["fusion.3"].endswith("block_0/mul")  # a fusion without metadata: what it fuses
    assert phase_and_scope(scopes["fusion.3"]) == ("backward", "Model/enc/block_0")
    assert phase_and_scope(scopes["add.2"], depth=2) == ("forward", "Model/enc")
    assert phase_and_scope("jit(step)/jvp(Model)/checkpoint/rematted_computation/enc/x")[0] == "recompute"
