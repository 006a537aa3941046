"""Peak memory of a calibration data pass must not grow with the number of samples.

For each sample count, a fresh child process builds the BatchCache for MobileNetV2 (zoo
images repeated through a generated list), makes two passes over it — the first decodes
and writes the cache, the second reads it back — and runs the float model in ONNX Runtime
on every batch, as range collection does. The parent prints each child's peak RSS and the
ratio large/small, and fails when the ratio exceeds --max-ratio.

    python scripts/bench_calibration_memory.py [--zoo ../shared/zoo] [--small 32] [--large 512]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import onnx
import onnxruntime as ort

from xslim_ort.calibration.cache import build_batch_source
from xslim_ort.calibration.readers import providers_for
from xslim_ort.config import load_config

REPO = Path(__file__).resolve().parent.parent
MEAN, STD = [123.675, 116.28, 103.53], [58.395, 57.12, 57.375]


def default_zoo() -> Path:
    return Path(os.environ.get("XSLIM_ORT_ZOO", REPO.parent / "shared" / "zoo"))


def run_child(zoo: Path, samples: int, passes: int) -> dict[str, float]:
    """One measurement, in this process: returns peak RSS (MiB), batches and seconds."""
    model_path = zoo / "models" / "mobilenet_v2.onnx"
    images = [zoo / "images" / line for line in (zoo / "images" / "calib.txt").read_text().split()]
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1  # the machine is shared; threads also add RSS noise
    session = ort.InferenceSession(str(model_path), options, providers=providers_for("cpu"))
    with tempfile.TemporaryDirectory(prefix="xslim-bench-", dir=Path.cwd()) as tmp:
        lst = Path(tmp) / "calib.txt"
        lst.write_text("".join(f"{images[i % len(images)]}\n" for i in range(samples)))
        entry = {"color_format": "rgb", "mean_value": MEAN, "std_value": STD, "preprocess_file": "PT_IMAGENET"}
        config = load_config(
            {
                "calibration_parameters": {
                    "calibration_step": samples,
                    "input_parametres": [{**entry, "data_list_path": str(lst)}],
                }
            }
        )
        start = time.perf_counter()
        batches = 0
        with build_batch_source(config, onnx.load(model_path), cache_dir=tmp) as source:
            for _ in range(passes):
                for batch in source():
                    session.run(None, batch)
                    batches += 1
        seconds = time.perf_counter() - start
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return {"samples": samples, "batches": batches, "peak_rss_mib": peak_kib / 1024, "seconds": seconds}


def measure(zoo: Path, samples: int, passes: int) -> dict[str, float]:
    """Run one measurement in a fresh interpreter, so each peak starts from the same baseline."""
    cmd = [sys.executable, __file__, "--zoo", str(zoo), "--child", str(samples), "--passes", str(passes)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--zoo", type=Path, default=default_zoo())
    parser.add_argument("--small", type=int, default=32)
    parser.add_argument("--large", type=int, default=512)
    parser.add_argument("--passes", type=int, default=2)
    parser.add_argument("--max-ratio", type=float, default=1.15)
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if not (args.zoo / "models" / "mobilenet_v2.onnx").is_file():
        print(f"model zoo not found at {args.zoo} (set XSLIM_ORT_ZOO or pass --zoo)", file=sys.stderr)
        return 2
    if args.child is not None:
        print(json.dumps(run_child(args.zoo, args.child, args.passes)))
        return 0
    results = [measure(args.zoo, n, args.passes) for n in (args.small, args.large)]
    for r in results:
        print(
            f"{r['samples']:5d} samples, {r['batches']:5d} batches over {args.passes} passes: "
            f"peak RSS {r['peak_rss_mib']:7.1f} MiB in {r['seconds']:.1f} s"
        )
    ratio = results[1]["peak_rss_mib"] / results[0]["peak_rss_mib"]
    verdict = "ok" if ratio <= args.max_ratio else "FAIL"
    print(f"peak RSS ratio {args.large}/{args.small}: {ratio:.3f} (limit {args.max_ratio}) {verdict}")
    return 0 if ratio <= args.max_ratio else 1


if __name__ == "__main__":
    sys.exit(main())
