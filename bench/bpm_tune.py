"""Learn the tempo detector's octave-decision weights and confidence scale from the tuning set.

Run:  python bench/bpm_tune.py [--write]

Tuning set (never the report sets that bench/bpm_accuracy.py scores):
* ``--n-realistic`` songs of bench/realistic_music.py's "tune" set (seeds from TUNE_SEED),
* synthetic clips of bench/bpm_accuracy.py's generator with seeds ``--synthetic-seeds``
  (default 10, 11, 12; the synthetic report run uses seed 0),
* ``--n-beatless`` beatless clips of the "tune" beatless set (confidence only).

Procedure (all in this file, nothing hand-set):
1. For every clip, acestep_lora.bpm finds its candidate tempi (salience peaks and their
   metrical relatives) and computes every cue of every candidate (``bpm.all_cue_names``).
   The label is the candidate within +-4 % of the ground truth (clips where no candidate
   is that close teach nothing about the octave and are left out).
2. Octave decision: a linear score over the standardised cues, softmax over each clip's
   candidates, cross-entropy plus an L2 penalty, fitted with L-BFGS.  The penalty is
   chosen by 5-fold cross-validation over clips (grouped so a clip is never in its own
   validation fold).  The terms in log-tempo - alone, squared and crossed with the
   clip's onset rate and drum-likeness - are the learned tempo prior (per style family).
3. Confidence: a logistic curve in log pulse clarity (``fit_confidence``): 0.5 - the
   threshold below which the tempo is "unknown" - at the widest-margin clarity between
   the beatless tuning clips and the music tuning clips, steepness from the two classes'
   medians.
4. ``--write`` replaces the block between ``# BEGIN LEARNED`` and ``# END LEARNED`` in
   acestep_lora/bpm.py with the fitted values.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
import time

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for _p in (_ROOT, os.path.join(_ROOT, "tests"), os.path.join(_ROOT, "bench")):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import numpy as np  # noqa: E402
import torch  # noqa: E402

from acestep_lora import bpm  # noqa: E402
import realistic_music as rm  # noqa: E402

LABEL_TOLERANCE = 0.04
LAMBDAS = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1)


def synthetic_clip(case: dict, cache_dir: str):
    """Synthetic clip of bench/bpm_accuracy.py's generator, cached as FLAC."""
    import hashlib
    import json

    import soundfile as sf
    from bpm_accuracy import render as render_synthetic

    key = hashlib.sha1(json.dumps(case, sort_keys=True).encode()).hexdigest()[:16]
    path = os.path.join(cache_dir, f"synthetic_{key}.flac")
    if os.path.exists(path):
        x, sr = sf.read(path, dtype="float32", always_2d=True)
        return torch.from_numpy(np.ascontiguousarray(x.T)), sr
    wav = render_synthetic(case)
    os.makedirs(cache_dir, exist_ok=True)
    sf.write(path + ".part.flac", wav.numpy().T, case["sample_rate"], subtype="PCM_24")
    os.replace(path + ".part.flac", path)
    return wav, case["sample_rate"]


def tuning_clips(n_realistic: int, synthetic_seeds, n_synthetic: int, n_beatless: int,
                 cache_dir: str):
    """Yield (name, group, waveform, sample_rate, truth or None)."""
    from bpm_accuracy import make_cases

    for song in rm.make_set("tune", n_realistic):
        wav, sr = rm.render(song, cache_dir)
        yield song.name, "realistic", wav, sr, rm.true_bpm(song)
    for seed in synthetic_seeds:
        for i, case in enumerate(make_cases(n_synthetic, seed)):
            wav, sr = synthetic_clip(case, cache_dir)
            yield f"synthetic{seed}_{i:03d}_{case['style']}", "synthetic", wav, sr, case["bpm"]
    for song in rm.make_beatless_set("tune", n_beatless):
        wav, sr = rm.render(song, cache_dir)
        yield song.name, "beatless", wav, sr, None


def extract(wav, sr, truth, min_bpm=60.0, max_bpm=200.0) -> dict | None:
    """Cues, candidates, label and clarity of one clip (None: no onsets at all)."""
    try:
        an = bpm._analyse(*bpm._prepare(wav, sr))
    except bpm._Unknown:
        return None
    out = dict(clarity=bpm._clarity(an, min_bpm, max_bpm), truth=truth)
    if truth is not None:
        cands = bpm._candidates(an, min_bpm, max_bpm)
        out["bpms"] = cands
        out["cues"] = bpm._candidate_features(an, cands, bpm.all_cue_names()).numpy()
        errs = [abs(c / truth - 1.0) for c in cands]
        j = int(np.argmin(errs))
        out["label"] = j if errs[j] <= LABEL_TOLERANCE else None
        out["an"] = an  # kept for the refinement check below
    return out


def fit_ranker(groups: list[tuple[np.ndarray, int]], lam: float, mean, scale) -> np.ndarray:
    """Softmax ranking weights; groups = [(cues [K, D], label)]."""
    xs = [torch.tensor((x - mean) / scale, dtype=torch.float64) for x, _ in groups]
    ys = [y for _, y in groups]
    # Pad to one tensor [G, Kmax, D] with a mask, so a step is a few tensor ops.
    kmax = max(x.shape[0] for x in xs)
    d = xs[0].shape[1]
    big = torch.zeros(len(xs), kmax, d, dtype=torch.float64)
    mask = torch.full((len(xs), kmax), -1e9, dtype=torch.float64)
    for i, x in enumerate(xs):
        big[i, : x.shape[0]] = x
        mask[i, : x.shape[0]] = 0.0
    target = torch.tensor(ys)
    w = torch.zeros(d, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w], lr=1.0, max_iter=500, tolerance_grad=1e-9,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        logits = big @ w + mask
        loss = torch.nn.functional.cross_entropy(logits, target) + lam * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach().numpy()


def rank_accuracy(groups, w, mean, scale) -> float:
    hits = [int(np.argmax(((x - mean) / scale) @ w)) == y for x, y in groups]
    return float(np.mean(hits))


def cross_validate(groups, lam: float, folds: int = 5, seed: int = 0) -> float:
    order = np.random.default_rng(seed).permutation(len(groups))
    hits = 0
    for f in range(folds):
        val = set(order[f::folds].tolist())
        train = [g for i, g in enumerate(groups) if i not in val]
        test = [g for i, g in enumerate(groups) if i in val]
        allx = np.concatenate([x for x, _ in train])
        mean, scale = allx.mean(0), allx.std(0) + 1e-6
        w = fit_ranker(train, lam, mean, scale)
        hits += rank_accuracy(test, w, mean, scale) * len(test)
    return hits / len(groups)


def fit_confidence(music: list[float], beatless: list[float]) -> tuple[float, float]:
    """(centre, slope) of the confidence curve ``1 / (1 + (centre / clarity) ** slope)``.

    centre: the clarity half way (geometrically) between the clearest beatless clip and the
    least clear music clip of the tuning set - the widest margin between the two classes -
    so confidence 0.5 (the threshold) separates them.  slope: confidence 0.05 at the median
    beatless clarity and 0.95 at the median music clarity, on average over the two sides.
    """
    floor = 1e-3
    lo, hi = max(max(beatless), floor), max(min(music), floor)
    centre = math.sqrt(lo * hi) if hi > lo else float(np.quantile(music, 0.01))
    med_b, med_m = max(float(np.median(beatless)), floor), float(np.median(music))
    slope = 2.0 * math.log(19.0) / (math.log(med_m) - math.log(med_b))
    return centre, slope


def _fmt(values) -> str:
    body = ", ".join(f"{float(v):.6g}" for v in values)
    return "(" + body + ("," if len(values) == 1 else "") + ")"


def write_learned(names, mean, scale, w, centre, slope, note: str) -> None:
    path = os.path.join(_ROOT, "acestep_lora", "bpm.py")
    src = open(path, encoding="utf-8").read()
    lines = ["# BEGIN LEARNED"] + [f"# {part}" for part in note.split("; ")] + ["FEATURES = ("]
    lines += [f"    {n!r}," for n in names]
    lines += [")"]
    for label, vals in (("_FEATURE_MEAN", mean), ("_FEATURE_SCALE", scale), ("_WEIGHTS", w)):
        body = _fmt(vals)[1:-1].split(", ")
        lines.append(f"{label} = (")
        row = "   "
        for v in body:
            if len(row) + len(v) + 2 > 96:
                lines.append(row)
                row = "   "
            row += f" {v.rstrip(',')},"
        lines.append(row)
        lines.append(")")
    lines += [f"_CONFIDENCE_CENTRE = {centre:.6g}", f"_CONFIDENCE_SLOPE = {slope:.6g}",
              "# END LEARNED"]
    new = re.sub(r"# BEGIN LEARNED\n.*?# END LEARNED", "\n".join(lines), src, flags=re.S)
    with open(path, "w", encoding="utf-8") as f:
        f.write(new)
    print(f"wrote the learned block into {path}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-realistic", type=int, default=240)
    ap.add_argument("--synthetic-seeds", type=int, nargs="*", default=[10, 11, 12])
    ap.add_argument("--n-synthetic", type=int, default=100)
    ap.add_argument("--n-beatless", type=int, default=48)
    ap.add_argument("--cache", default=rm.DEFAULT_CACHE)
    ap.add_argument("--features", nargs="*", default=None, help="subset of cue names")
    ap.add_argument("--write", action="store_true", help="write the block into bpm.py")
    args = ap.parse_args(argv)
    problem = rm.check_tools()
    if problem:
        print(f"bpm_tune: cannot render the realistic tuning set: {problem}")
        return 0
    torch.set_num_threads(1)
    names = tuple(args.features) if args.features else bpm.all_cue_names()
    idx = [bpm.all_cue_names().index(n) for n in names]
    t0 = time.perf_counter()
    rows = []
    for name, group, wav, sr, truth in tuning_clips(args.n_realistic, args.synthetic_seeds,
                                                    args.n_synthetic, args.n_beatless,
                                                    args.cache):
        r = extract(wav, sr, truth)
        rows.append((name, group, r))
    print(f"{len(rows)} tuning clips analysed in {time.perf_counter() - t0:.0f} s")
    groups, names_used = [], []
    music_clarity, beatless_clarity = [], []
    no_label = []
    for name, group, r in rows:
        if group == "beatless":
            beatless_clarity.append(r["clarity"] if r else 0.0)
            continue
        music_clarity.append(r["clarity"] if r else 0.0)
        if r is None or r["label"] is None:
            no_label.append(name)
            continue
        groups.append((r["cues"][:, idx], r["label"]))
        names_used.append(name)
    print(f"music clips with a candidate within +-{100 * LABEL_TOLERANCE:g} %: {len(groups)}; "
          f"without: {len(no_label)} {no_label[:10]}")
    cv = {lam: cross_validate(groups, lam) for lam in LAMBDAS}
    for lam, acc in cv.items():
        print(f"  L2 {lam:g}: 5-fold CV octave accuracy {100 * acc:.1f} %")
    best = max(cv.values())
    lam = max(lam for lam, acc in cv.items() if acc >= best - 0.002)  # prefer simpler
    allx = np.concatenate([x for x, _ in groups])
    mean, scale = allx.mean(0), allx.std(0) + 1e-6
    w = fit_ranker(groups, lam, mean, scale)
    train_acc = rank_accuracy(groups, w, mean, scale)
    print(f"chosen L2 {lam:g}; training accuracy {100 * train_acc:.1f} %")
    for n, wi in sorted(zip(names, w), key=lambda t: -abs(t[1])):
        print(f"  {n:<26} {wi:+.3f}")
    centre, slope = fit_confidence(music_clarity, beatless_clarity)
    conf = lambda c: bpm.confidence_from_clarity(c, centre, slope)  # noqa: E731
    th = bpm.CONFIDENCE_THRESHOLD
    mu = np.mean([conf(c) < th for c in music_clarity])
    bu = np.mean([conf(c) < th for c in beatless_clarity])
    print(f"confidence: clarity centre {centre:.3f}, slope {slope:.3f}; tuning music unknown "
          f"{100 * mu:.1f} %, beatless unknown {100 * bu:.1f} %")
    print("  music clarity (lowest):", [round(c, 2) for c in sorted(music_clarity)[:8]])
    print("  beatless clarity (highest):", [round(c, 2) for c in sorted(beatless_clarity)[-8:]])
    if args.write:
        note = (f"bench/bpm_tune.py: {len(groups)} labelled tuning clips (realistic tune set "
                f"{args.n_realistic}, synthetic seeds {args.synthetic_seeds}); L2 {lam:g}, "
                f"5-fold CV octave accuracy {100 * cv[lam]:.1f} %; confidence from "
                f"{len(music_clarity)} music and {len(beatless_clarity)} beatless tuning clips")
        write_learned(names, mean, scale, w, centre, slope, note)
    return 0


if __name__ == "__main__":
    sys.exit(main())
