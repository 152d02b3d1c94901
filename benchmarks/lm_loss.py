"""Large-vocabulary logit loss: kdistill plain and chunked vs TRL's GKDTrainer.generalized_jsd_loss.

Every case starts from the same final hidden states and LM heads (student and teacher), computes the
generalised JSD at β and backpropagates to the student's hidden states and head, fp32, batch 1:
  plain    logits = h @ Wᵀ for both models, then kdistill.losses.functional.generalized_jsd
  trl      the same logits, then TRL's GKDTrainer.generalized_jsd_loss (reduction="batchmean" / L)
  chunked  kdistill.losses.chunked.chunked_divergence on (h, W) directly, its default chunk (or --chunk
           tokens at a time); on CUDA its rows run in Triton (kdistill.losses.triton_rows), and
  chunked-torch  the same with the torch kernels, so the table shows what the fused rows add
--matmul-precision high lets every method's float32 matmuls use TF32 (torch.set_float32_matmul_precision);
the default, highest, keeps them exact float32.
On the CPU each case runs in its own subprocess; "extra peak memory" is that process's peak RSS over the
timed steps minus its RSS before them, after the imports, the inputs and one warm-up step, so none of those
is counted (the first step's own growth, code pages and thread pools loaded once, which every method pays
alike, is in the JSON as first_step_mib; the peak does include the gradients, which every method returns:
grads_mib). glibc is told to give every freed block over 64 KiB back at once (MALLOC_MMAP_THRESHOLD_), so
a buffer kept from the warm-up cannot hide in the baseline. "seconds" is the best wall time of --repeats steps after a
warm-up, "cpu_seconds" the process CPU time of that step (less sensitive to other jobs sharing the
machine; BENCH_THREADS sets torch's threads). Values are checked against the plain result
(1e-5 relative). With --device cuda the cases run in one process, timed with the device synchronised,
and the extra peak memory is torch's peak allocation minus what the inputs hold.

    python benchmarks/lm_loss.py [--vocab 32000 128000] [--length 512 2048] [--beta 0 0.5 1] [--repeats 2]
                                 [--device cuda]

Prints a table and records the run in benchmarks/results/lm_loss.json under "runs", replacing an
earlier run of the same command on the same device. TRL is a benchmark-only dependency (`pip install --no-deps trl`);
without it the trl column is skipped.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HIDDEN = 384


def inputs(vocab: int, length: int, device: str = "cpu"):
    import torch

    g = torch.Generator().manual_seed(0)
    h_s = torch.randn(1, length, HIDDEN, generator=g).to(device)
    h_t = torch.randn(1, length, HIDDEN, generator=g).to(device)
    # scaled in place: a temporary here would raise the peak-RSS baseline and hide that much of
    # every method's extra memory
    w_s = torch.randn(vocab, HIDDEN, generator=g).to(device).mul_(0.05)
    w_t = torch.randn(vocab, HIDDEN, generator=g).to(device).mul_(0.05)
    return h_s.requires_grad_(), w_s.requires_grad_(), h_t, w_t


def run_case(method: str, vocab: int, length: int, beta: float, repeats: int, chunk: int | None,
             device: str = "cpu") -> dict:
    import torch

    cuda = device.startswith("cuda")
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", torch.get_num_threads())))
    # imports first, so their memory is part of the baseline and not of the loss
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from kdistill.losses.chunked import chunked_divergence
    from kdistill.losses.functional import generalized_jsd
    if method == "trl":
        from trl.experimental.gkd.gkd_trainer import GKDTrainer
    h_s, w_s, h_t, w_t = inputs(vocab, length, device)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()

    def step():
        h_s.grad = w_s.grad = None
        if method.startswith("chunked"):
            loss = chunked_divergence(h_s, w_s, h_t, w_t, divergence="generalized_jsd", beta=beta, chunk_size=chunk,
                                      kernels="torch" if method == "chunked-torch" else "auto")
        else:
            zs = h_s @ w_s.T
            with torch.no_grad():
                zt = h_t @ w_t.T
            if method == "trl":
                loss = GKDTrainer.generalized_jsd_loss(zs, zt, beta=beta, reduction="batchmean") / length
            else:
                loss = generalized_jsd(zs, zt, beta=beta)
        loss.backward()
        return float(loss)  # float() waits for the device, so each timed step is complete

    if not cuda:
        before_warm_up = rss_mib("VmRSS")
    value = step()  # warm-up (and the value)
    if not cuda:
        h_s.grad = w_s.grad = None  # each timed step makes its own
        first_step = rss_mib("VmRSS") - before_warm_up
        base = reset_peak_rss()
    times = []
    for _ in range(repeats):
        start, cpu = time.perf_counter(), time.process_time()
        step()
        times.append((time.perf_counter() - start, time.process_time() - cpu))
    seconds, cpu_seconds = min(times)
    if cuda:
        extra = (torch.cuda.max_memory_allocated() - base) / 2**20
        return {"value": value, "seconds": seconds, "cpu_seconds": cpu_seconds, "extra_peak_mib": extra}
    return {"value": value, "seconds": seconds, "cpu_seconds": cpu_seconds, "extra_peak_mib": rss_mib("VmHWM") - base,
            "first_step_mib": first_step}


def rss_mib(field: str) -> float:
    """VmRSS (now) or VmHWM (the peak since the last reset) of this process, in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def reset_peak_rss() -> float:
    """Start a new peak-RSS window (Linux: writing 5 to clear_refs resets VmHWM); returns the RSS now."""
    Path("/proc/self/clear_refs").write_text("5")
    return rss_mib("VmRSS")


def in_process(*args) -> dict:
    """A CUDA case: one process is enough, as the allocator's peak resets per case."""
    import torch

    try:
        return run_case(*args)
    except Exception as error:  # noqa: BLE001 - an out-of-memory case is a result, not the end of the run
        return {"error": f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"}
    finally:
        torch.cuda.empty_cache()


def in_subprocess(*args, precision: str = "highest") -> dict:
    out = subprocess.run([sys.executable, __file__, "--matmul-precision", precision, "--case", *map(str, args)],
                         capture_output=True, text=True, env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"})
    if out.returncode != 0:
        return {"error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"exit {out.returncode}"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def has_triton(device: str) -> bool:
    import torch

    from kdistill.losses import triton_rows

    return device != "cpu" and triton_rows.available(torch.device(device))


def has_trl() -> bool:
    import importlib.util

    return importlib.util.find_spec("trl") is not None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=int, nargs="+", default=[32000, 128000])
    parser.add_argument("--length", type=int, nargs="+", default=[512, 2048])
    parser.add_argument("--beta", type=float, nargs="+", default=[0.0, 0.5, 1.0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--chunk", type=int, default=None, help="tokens per chunk (default: chunked_divergence's own)")
    parser.add_argument("--device", default="cpu", help="cpu, or cuda: the cases then run in this process")
    parser.add_argument("--matmul-precision", default="highest", choices=["highest", "high"],
                        help="high: float32 matmuls may use TF32 (every method alike)")
    parser.add_argument("--case", nargs=6, help=argparse.SUPPRESS)
    args = parser.parse_args()
    import torch

    torch.set_float32_matmul_precision(args.matmul_precision)
    if args.case:
        method, vocab, length, beta, repeats, chunk = args.case
        chunk = None if chunk == "auto" else int(chunk)
        print(json.dumps(run_case(method, int(vocab), int(length), float(beta), int(repeats), chunk)))
        return

    from rich.console import Console
    from rich.table import Table

    methods = ["plain", "chunked"] + (["chunked-torch"] if has_triton(args.device) else []) + (["trl"] if has_trl() else [])
    load_before = os.getloadavg()
    rows = []
    for vocab in args.vocab:
        for length in args.length:
            for beta in args.beta:
                # what every method must return and so counts in its extra memory: dL/dW and dL/dh
                row = {"vocab": vocab, "length": length, "beta": beta,
                       "grads_mib": (vocab + length) * HIDDEN * 4 / 2**20}
                for method in methods:
                    if args.device != "cpu":
                        result = in_process(method, vocab, length, beta, args.repeats, args.chunk, args.device)
                    else:
                        result = in_subprocess(method, vocab, length, beta, args.repeats, args.chunk or "auto",
                                               precision=args.matmul_precision)
                    if "error" in result:
                        row[method] = {"error": result["error"]}
                        continue
                    row[method] = result
                plain = row["plain"].get("value")
                for method in methods:
                    value = row[method].get("value")
                    if value is not None and plain is not None:
                        row[method]["matches_plain"] = abs(value - plain) <= 1e-5 * max(1.0, abs(plain))
                        # kept beside the 1e-5 check, which TF32 products also pass: strict fp32 paths differ
                        # from plain by ~1e-7 relative, TF32 ones (tensor cores) by ~1e-6
                        row[method]["relative_difference"] = (value - plain) / plain if plain else None
                rows.append(row)
                print(json.dumps(row), flush=True)

    precision = "fp32" if args.matmul_precision == "highest" else "fp32, TF32 matmuls"
    table = Table(title=f"generalised JSD on {args.device}, forward + backward, {precision}, batch 1 "
                        "(seconds / extra peak MiB)")
    for col in ["vocab", "length", "β", *methods, "chunked vs trl"]:
        table.add_column(col, justify="right")
    for row in rows:
        cells = [f"{row['vocab']:,}", str(row["length"]), str(row["beta"])]
        for method in methods:
            r = row[method]
            cells.append(r["error"][:30] if "error" in r else
                         f"{r['seconds']:.2f} s / {r['extra_peak_mib']:.0f} MiB{'' if r.get('matches_plain', True) else ' ≠'}")
        if "trl" in methods and "seconds" in row["trl"] and "seconds" in row["chunked"]:
            cells.append(f"{row['trl']['seconds'] / row['chunked']['seconds']:.1f}× faster, "
                         f"{row['chunked']['extra_peak_mib'] / max(row['trl']['extra_peak_mib'], 1e-9):.2f}× memory")
        else:
            cells.append("")
        table.add_row(*cells)
    Console().print(table)
    save(rows, args.chunk, load_before, args.device, args.matmul_precision)


def save(rows: list, chunk: int | None, load_before: tuple, device: str, precision: str) -> None:
    """Record this run in results/lm_loss.json beside the other commands' runs."""
    import torch

    out = Path(__file__).parent / "results" / "lm_loss.json"
    out.parent.mkdir(exist_ok=True)
    threads = os.environ.get("BENCH_THREADS")
    command = " ".join([f"BENCH_THREADS={threads}"] * bool(threads) + ["python benchmarks/lm_loss.py", *sys.argv[1:]])
    previous = json.loads(out.read_text()).get("runs", []) if out.exists() else []
    run = {"command": command.strip(), "chunk": chunk or "auto", "created": time.strftime("%Y-%m-%d %H:%M"),
           "threads": int(threads or torch.get_num_threads()), "matmul_precision": precision,
           # other jobs on the machine slow every method, the many small ops of a chunked pass most
           "load_avg_1min": {"before": round(load_before[0], 2), "after": round(os.getloadavg()[0], 2)},
           "machine": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
           "trl": importlib.metadata.version("trl") if has_trl() else None,
           "device": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu", "rows": rows}
    # a run replaces the same command's run on the same device only: the H100 and H200 runs of one command both stay
    runs = [r for r in previous if (r.get("command"), r.get("device")) != (run["command"], run["device"])] + [run]
    # machine, cpus and torch are per run: runs from different machines (a CPU here, a lent GPU) share the file
    out.write_text(json.dumps({"hidden": HIDDEN, "created": run["created"], "runs": runs}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
