"""`make bench`: every benchmark in one command; with --record each appends its table to bench/RESULTS.md."""
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPTS = ["launch_count.py", "memory_model.py", "train_step.py", "prepare_speed.py", "bpm_accuracy.py"]

if __name__ == "__main__":
    extra = sys.argv[1:]
    failed = []
    for script in SCRIPTS:
        path = os.path.join(HERE, script)
        if not os.path.exists(path):
            continue
        print(f"\n=== {script}", flush=True)
        args = [a for a in extra if a != "--record" or script != "bpm_accuracy.py"]
        if subprocess.call([sys.executable, path, *args]) != 0:
            failed.append(script)
    sys.exit(1 if failed else 0)
