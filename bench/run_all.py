"""`make bench`: every benchmark in one command; with --record each appends its table to bench/RESULTS.md.

On a CUDA GPU, `bash bench/gpu_session.sh` is the one-go session instead (CUDA tests, eager / compiled / CUDA-graph
timing tables, profiled launches, targets)."""
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
# (script, its own arguments): the current benchmarks, each documented in its docstring and in RESULTS.md
SCRIPTS = [
    ("launch_count.py", ["--official", "--compiled"]),  # kernel launches per step: official, eager, compiled
    ("memory_model.py", []),  # the memory model's check against the official peaks, our step's peaks
    ("train_step.py", []),  # ms/step, audio-s/s, peak memory of the real step
    ("ddp_scaling.py", []),  # data-parallel scaling over 1, 2 and all GPUs (gloo processes on a CPU)
    ("prepare_speed.py", []),  # Prepare throughput
    ("bpm_accuracy.py", []),  # tempo auto-detection accuracy
]
NO_RECORD = {"bpm_accuracy.py"}  # prints its table only

if __name__ == "__main__":
    extra = sys.argv[1:]
    failed = []
    for script, own in SCRIPTS:
        path = os.path.join(HERE, script)
        print(f"\n=== {script}", flush=True)
        args = own + [a for a in extra if a != "--record" or script not in NO_RECORD]
        if subprocess.call([sys.executable, path, *args]) != 0:
            failed.append(script)
    if failed:
        print(f"failed: {', '.join(failed)}", flush=True)
    sys.exit(1 if failed else 0)
