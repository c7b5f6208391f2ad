"""Time the PyTorch CineMA reference's MAE train step on this machine, for the side-by-side in README "Performance".

Not part of the package (PyTorch is not a dependency): run it with a separate Python that has torch, timm and the
reference package (`mathpluscode/CineMA`, tested at commit 4e352ac) importable, e.g.

    python3.11 -m venv /tmp/torchvenv && /tmp/torchvenv/bin/pip install torch==2.14.1 torchvision==0.29.1 timm \
        einops omegaconf huggingface_hub monai safetensors
    PYTHONPATH=/path/to/CineMA /tmp/torchvenv/bin/python tools/torch_reference_bench.py --batch 2 --threads 2

It builds the reference model with its own `get_model` from its pretraining config (MAE-base, SAX 192x192x16 and
three LAX 256x256 views, conv stem (64, 128) x 2 blocks, gradient checkpointing as configured there), and times the
step its pretraining loop runs: forward with mask ratio 0.75, backward, gradient clipping at 5, AdamW (betas 0.9,
0.95, weight decay 0.05 without bias/norm). It prints one JSON line with the fields our bench uses for the same step
(`python -m cinema_jax.bench --config=configs/bench.py:mae_base --config.remat=block`): step_time_s (median),
samples_per_s, flops_per_step (torch's FlopCounterMode over one step), achieved_flops_per_s, and the float32 peak of
a 2048^2 matmul measured in the same run, and `mkl_isa`: the code path MKL's sgemm took (from its verbose banner).

On AMD CPUs MKL takes a generic AVX2 path unless it believes the CPU is Intel's. For a like-for-like comparison
with XLA (whose dots use AVX-512 there), interpose MKL's vendor check, which libtorch_cpu exports:

    printf 'int mkl_serv_intel_cpu_true(void){return 1;}\nint mkl_serv_intel_cpu(void){return 1;}\n' > shim.c
    gcc -shared -fPIC -O2 -o /tmp/libmkl_intel_shim.so shim.c
    LD_PRELOAD=/tmp/libmkl_intel_shim.so PYTHONPATH=... python tools/torch_reference_bench.py ...

`mkl_isa` then names AVX-512 and the matmul peak roughly doubles (Zen 5: 195-205 -> 458-468 GFLOP/s).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import time


def _matmul_peak(torch, n: int = 2048, reps: int = 5) -> float:
    a = torch.randn(n, n)
    b = torch.randn(n, n)
    a @ b
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        ts.append(time.perf_counter() - t0)
    return 2 * n**3 / min(ts)  # fastest call, as cinema_jax.bench.matmul_peak


def _mkl_isa(torch) -> str:
    """The ISA banner MKL prints in verbose mode ('Intel(R) Advanced Vector Extensions 512 ...' or the generic
    'Intel(R) Architecture processors'): MKL writes it to the C stdout, so capture file descriptor 1."""
    import tempfile

    a = torch.randn(64, 64)
    with tempfile.TemporaryFile() as f:
        saved = os.dup(1)
        os.dup2(f.fileno(), 1)
        try:
            with torch.backends.mkl.verbose(torch.backends.mkl.VERBOSE_ON):
                a @ a
        finally:
            os.dup2(saved, 1)
            os.close(saved)
        f.seek(0)
        text = f.read().decode(errors="replace")
    for line in text.splitlines():
        if "architecture" in line:
            return line.split("architecture", 1)[1].split(", Lnx")[0].strip()
    return "unknown"


def _host_malloc() -> str:
    """As `cinema_jax.bench.host_malloc` (not importable from the torch venv): step times depend on the malloc."""
    with open("/proc/self/maps") as f:
        maps = f.read()
    return next((n for n in ("tcmalloc", "jemalloc", "mimalloc") if f"/lib{n}" in maps), "glibc")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--grad-ckpt", choices=("config", "on", "off"), default="config")
    args = ap.parse_args()

    import cinema
    import torch
    from cinema.mae.mae import get_model
    from omegaconf import OmegaConf
    from timm.optim import param_groups_weight_decay

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg_path = os.path.join(os.path.dirname(cinema.__file__), "mae", "config.yaml")
    cfg = OmegaConf.load(cfg_path)
    if args.grad_ckpt != "config":
        cfg.grad_ckpt = args.grad_ckpt == "on"
    model = get_model(cfg)
    model.train()
    opt = torch.optim.AdamW(param_groups_weight_decay(model, weight_decay=cfg.train.weight_decay),
                            lr=cfg.train.lr, betas=tuple(cfg.train.betas))
    sizes = {"sax": tuple(cfg.data.sax.patch_size), **{v: tuple(cfg.data.lax.patch_size)
                                                        for v in ("lax_2c", "lax_3c", "lax_4c")}}
    batch = {v: torch.rand(args.batch, 1, *s) for v, s in sizes.items() if v in cfg.model.views}

    def step() -> float:
        loss = model(batch, cfg.train.enc_mask_ratio)[0]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.clip_grad)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        step()  # also the first warm-up step
    flops = float(counter.get_total_flops())
    for _ in range(max(args.warmup - 1, 0)):
        step()
    times = []
    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    for _ in range(args.steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    ru1 = resource.getrusage(resource.RUSAGE_SELF)
    t = statistics.median(times)
    peak = _matmul_peak(torch)
    print(json.dumps({
        "name": "torch_reference_mae_base", "framework": f"torch {torch.__version__}", "threads": args.threads,
        "batch_size": args.batch, "grad_ckpt": bool(cfg.grad_ckpt), "step_time_s": t, "step_times_s": times,
        "samples_per_s": args.batch / t, "flops_per_step": flops, "achieved_flops_per_s": flops / t,
        "matmul_peak_flops_per_s": peak, "peak_fraction": flops / t / peak,
        "n_params": sum(p.numel() for p in model.parameters()),
        "host_malloc": _host_malloc(), "mkl_isa": _mkl_isa(torch),
        "host_cpu_s_per_step": {"user": (ru1.ru_utime - ru0.ru_utime) / len(times),
                                "sys": (ru1.ru_stime - ru0.ru_stime) / len(times)},
    }), flush=True)


if __name__ == "__main__":
    main()
